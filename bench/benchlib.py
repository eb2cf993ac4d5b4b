"""What bench.py and memory.py share: free loopback ports and waiting for a server to answer. Standard library."""
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, what: str | None = None, timeout: float = 20.0) -> None:
    """Polls `url` until it answers; exits with one line when `proc` dies first or `timeout` passes."""
    what = what or url
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            sys.exit(f"bench: {what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: {what} did not answer {url} within {timeout} s")
