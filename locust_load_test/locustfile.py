"""Load test of the fan-out stack through nginx, as the original's locust_load_test did, with stricter checks.

Each simulated user logs in once on start, then, waiting 0.1 to 1 s between tasks:
  - GET /login                     (nginx round-robins it over the backends: must answer 200)
  - POST /register                 (a fresh, unique username, form-encoded: must answer 201)
  - POST /changePassword           (for a user this simulated user registered: must answer 201)

Requests are named by endpoint, so the report has one row per endpoint. Any other status is a failure.
Run it headless against the local stack with `make load-test` (which also checks that every backend converged),
or with Docker workers: see locust_load_test/docker-compose.yml. Users, spawn rate, duration and host come from
the command line (-u, -r, -t, --host) or the environment (LOCUST_USERS, LOCUST_SPAWN_RATE, LOCUST_RUN_TIME,
LOCUST_HOST), as Locust reads them.
"""

import random
import uuid

from locust import FastHttpUser, between, task

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class StackUser(FastHttpUser):
    wait_time = between(0.1, 1.0)

    def on_start(self):
        # A run-unique prefix so that repeated runs against the same backends never collide.
        self.prefix = uuid.uuid4().hex[:12]
        self.counter = 0
        self.registered = []
        self.login()

    def expect(self, method, path, body, status):
        with self.client.request(method, path, data=body, headers=FORM if body else None, name=path,
                                 catch_response=True) as resp:
            if resp.status_code != status:
                resp.failure(f"expected {status}, got {resp.status_code}: {(resp.text or '')[:120]}")
                return False
            return True

    @task(4)
    def login(self):
        self.expect("GET", "/login", None, 200)

    @task(2)
    def register(self):
        self.counter += 1
        username = f"load-{self.prefix}-{self.counter}"
        password = uuid.uuid4().hex
        if self.expect("POST", "/register", f"username={username}&password={password}", 201):
            self.registered.append(username)

    @task(1)
    def change_password(self):
        if not self.registered:
            return self.register()
        username = random.choice(self.registered)
        self.expect("POST", "/changePassword", f"username={username}&password={uuid.uuid4().hex}", 201)
