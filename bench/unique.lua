-- wrk script: each request a query string of its own, so that a cached route never has it
-- stored (every request a miss). The query is n=<run>-<thread>-<count>: <run> the argument
-- after `--` (bench.py's wrk_run gives a label unique to each wrk run, so the runs against one
-- gateway never repeat a key), <thread> each wrk thread's number (threads never collide),
-- <count> a counter of the thread's own. Then report.lua's done() (its WRKJSON line).
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

local prefix
local count = 0

function init(args)
  local sep = wrk.path:find("?", 1, true) and "&" or "?"
  prefix = wrk.path .. sep .. "n=" .. (args[1] or "run") .. "-" .. id .. "-"
end

function request()
  count = count + 1
  return wrk.format(nil, prefix .. count)
end

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "report.lua")
