-- wrk script of the benchmark: `wrk ... -s bench/wrk.lua URL -- METHOD` (GET or POST; default POST).
-- POST bodies are form-encoded writes over a bounded set of user names (register = create or replace, so the
-- backends' memory stays flat however long the run), unique per wrk thread so that threads never share a user.
-- At the end one line `BENCH {json}` gives requests, duration, non-2xx answers, socket errors and latencies.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  method = args[1] or "POST"
end

function request()
  if method == "GET" then
    return wrk.format("GET")
  end
  counter = counter + 1
  local body = string.format("username=bench-%d-%d&password=pw%d", tid, counter % 2000, counter)
  return wrk.format("POST", nil, { ["Content-Type"] = "application/x-www-form-urlencoded" }, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
