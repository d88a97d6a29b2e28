"""Test helper: imports layerflow once, then forks `layerflow` CLI processes on request.

Starting `python -m layerflow` costs ~2 s of imports; the fault tests start a trainer a dozen
times, so they talk to this server instead (one JSON request per line on stdin, one JSON reply
per line on stdout). Every trainer is a real separate process (os.fork) running `cli.main(argv)`
with its output in a log file; tests signal it by pid (SIGKILL, SIGTERM, SIGINT) and ask the
server, its parent, to reap it. The server does no tensor work before forking, so forking after
importing torch is safe.

    {"op": "start", "argv": [...], "env": {...}, "log": path} -> {"pid": n}
    {"op": "wait", "pid": n}                                   -> {"code": exit code or -signal}
"""

import json
import os
import sys

import torch._dynamo  # noqa: F401  (imported lazily by the first AdamW: ~3 s)

import layerflow.cli  # noqa: F401  (the expensive imports, done once)
import layerflow.plots  # noqa: F401
import layerflow.train  # noqa: F401


def serve() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "start":
            pid = os.fork()
            if pid == 0:
                os.environ.update(req.get("env", {}))
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = 99
                try:
                    code = layerflow.cli.main(req["argv"])
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            reply = {"pid": pid}
        elif req["op"] == "wait":
            _, status = os.waitpid(req["pid"], 0)
            reply = {"code": os.waitstatus_to_exitcode(status)}
        else:
            reply = {"error": f"unknown op {req['op']!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    serve()
