-- wrk script for `make bench`: BENCH_MODE=get asks GET /person/{random id in 1..BENCH_PERSONS};
-- BENCH_MODE=post registers people with e-mails unique per run (BENCH_TAG), thread and request.
-- BENCH_MODE=list asks GET for one of the paths in the file BENCH_PATHS (one a line) at random.
-- `done` prints the figures as one JSON line for bench/run.py.

local mode = os.getenv("BENCH_MODE")
local persons = tonumber(os.getenv("BENCH_PERSONS") or "1")
local tag = os.getenv("BENCH_TAG") or "0"
local threads = {}
local counter = 0
local paths = {}

function setup(thread)
   thread:set("thread_id", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   math.randomseed(os.time() * 100 + thread_id)
   if mode == "list" then
      for path in io.lines(os.getenv("BENCH_PATHS")) do
         table.insert(paths, path)
      end
   end
end

function request()
   if mode == "get" then
      return wrk.format("GET", "/person/" .. math.random(persons))
   end
   if mode == "list" then
      return wrk.format("GET", paths[math.random(#paths)])
   end
   counter = counter + 1
   local body = string.format(
      '{"first_name":"Ada","last_name":"Lovelace","email":"ada.%s.%d.%d@bench.example.org"}',
      tag, thread_id, counter)
   return wrk.format("POST", "/person", {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
      '"status_errors": %d, "socket_errors": %d}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      latency.max, errors.status, errors.connect + errors.read + errors.write + errors.timeout))
end
