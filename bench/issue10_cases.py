"""Issue 10's cases, run as a user would: the command line in a subprocess, one case at a time.

For every case it records the command, the exit status, whether a traceback appeared, how many
``Error:`` lines were printed, the message, and whether any file of a protected directory (an
existing run, a user's folder) was deleted or changed. Results go to
``bench/results/issue10_cases_<label>.json``.

    taskset -c 0 nice -n 5 python bench/issue10_cases.py --label after
    taskset -c 0 nice -n 5 python bench/issue10_cases.py --root ../wt-before --label before

``--root`` is the checkout whose ``cli.py`` is run (default: this one); the cases and the result
file are this checkout's. Not timing-sensitive. Some cases need root (a tiny tmpfs via
``unshare -m`` for a real full disk, ``setpriv`` to run as ``nobody`` for permission errors);
without it they are recorded as skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = ["--model", "mlp", "--stages", "1", "--epochs", "1", "--limit", "200"]
LONG = ["--model", "mobilenet_v1", "--stages", "3", "--epochs", "3", "--limit", "1000"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def snapshot(folder: Path | None) -> dict[str, str]:
    if folder is None or not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


class Cases:
    def __init__(self, root: Path, work: Path) -> None:
        self.root, self.work = root, work
        self.cases: list[tuple[str, str, Callable[[Path], dict[str, Any]]]] = []
        self.has_overwrite = "--overwrite" in (root / "cli.py").read_text()

    def case(self, section: str, name: str):
        def add(fn):
            self.cases.append((section, name, fn))
            return fn
        return add

    # -- helpers ---------------------------------------------------------------------------------
    def cli(self, *args: str, cwd: Path | None = None, prefix: list[str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [*(prefix or []), PY, str(self.root / "cli.py"), *args]
        return subprocess.run(cmd, cwd=cwd or self.root, env={**ENV, "PYTHONPATH": str(self.root)},
                              capture_output=True, text=True, timeout=timeout)

    def run_dir(self, tmp: Path, name: str = "run", *extra: str) -> Path:
        """A completed tiny run (copied from one made once per settings)."""
        key = hashlib.sha256(" ".join(extra).encode()).hexdigest()[:8]
        cached = self.work / f"cached-{key}"
        if not cached.exists():
            p = self.cli("grow", *TINY, *extra, "--out", str(cached))
            assert p.returncode == 0, p.stderr
        out = tmp / name
        shutil.copytree(cached, out)
        return out

    def npz_dir(self, tmp: Path, *, y_train: np.ndarray | None = None, name: str = "npz") -> Path:
        d = tmp / name
        d.mkdir()
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
        y = rng.integers(0, 4, 40) if y_train is None else y_train
        np.savez(d / "train.npz", x=x, y=y)
        np.savez(d / "test.npz", x=x[:10], y=rng.integers(0, 4, 10))
        return d

    def lut_grow_with_latency(self, tmp: Path, name: str, value_ms: float, *, networks: bool) -> dict:
        """``grow --cost lut`` on a copy of the shipped profile whose every row (and, with ``networks``,
        every whole network) reads ``value_ms``."""
        prof = json.loads(sorted((self.root / "profiles").glob("*.json"))[0].read_text())
        for r in prof["rows"] + (prof.get("networks", []) if networks else []):
            r["latency_ms"] = {"median": value_ms, "p25": value_ms, "p75": value_ms, "n": 5}
        (tmp / name).write_text(json.dumps(prof))
        return {"argv": ["grow", "--cost", "lut", "--profile", str(tmp / name), "--stages", "1",
                         "--epochs", "1", "--limit", "200", "--out", str(tmp / "run")]}


def define(c: Cases) -> None:  # noqa: C901 - one flat list of cases, in the issue's order
    # ---- 1. data loss ------------------------------------------------------------------------------
    for name, args in [("npz --data-dir does-not-exist", ["--dataset", "npz", "--data-dir", "does-not-exist"]),
                       ("bad --model", ["--model", "vgg16"]),
                       ("bad --activation", ["--activation", "nonsense"]),
                       ("--width-mult 0", ["--width-mult", "0"]),
                       ("bad --dataset", ["--dataset", "mnist-nope"])]:
        @c.case("1 data loss", f"grow {name} onto an existing run")
        def _(tmp, args=args):
            run = c.run_dir(tmp)
            return {"argv": ["grow", *TINY, *args, *(["--overwrite"] if c.has_overwrite else []), "--out", str(run)],
                    "protect": run}

    @c.case("1 data loss", "grow --out a folder with the user's config.json and summary.md")
    def _(tmp):
        d = tmp / "mine"
        d.mkdir()
        (d / "config.json").write_text('{"my": "settings"}\n')
        (d / "summary.md").write_text("# my notes\n")
        return {"argv": ["grow", *TINY, *(["--overwrite"] if c.has_overwrite else []), "--out", str(d)],
                "protect": d}

    @c.case("1 data loss", "profile of an unsupported device kind onto an existing run")
    def _(tmp):
        run = c.run_dir(tmp)
        prof = json.loads((c.root / "profiles" / "cpu-amd-epyc-2t-onnxruntime.json").read_text())
        prof["device"]["kind"] = "tpu"
        (tmp / "tpu.json").write_text(json.dumps(prof))
        return {"argv": ["grow", *TINY, "--model", "mobilenet_v1", "--cost", "lut", "--profile",
                         str(tmp / "tpu.json"), *(["--overwrite"] if c.has_overwrite else []), "--out", str(run)],
                "protect": run}

    @c.case("1 data loss", "grow onto an existing run without --overwrite")
    def _(tmp):
        run = c.run_dir(tmp)
        return {"argv": ["grow", *TINY, "--out", str(run)], "protect": run}

    # ---- 2. one writer per run ---------------------------------------------------------------------
    def consistent(out: Path) -> bool:
        """config.json's stage count made stages.jsonl, and every checkpoint holds its record's architecture."""
        import torch
        cfg = json.loads((out / "config.json").read_text())
        records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
        if [r["stage"] for r in records] != list(range(cfg["stages"] + 1)):
            return False
        return all(torch.load(out / f"stage-{r['stage']}.pt", weights_only=True)["architecture"] == r["architecture"]
                   for r in records)

    def writer(out: Path, *extra: str) -> subprocess.Popen:
        """A grow long enough (tens of seconds) for a second command to meet it mid-run."""
        return subprocess.Popen([PY, str(c.root / "cli.py"), "grow", *LONG, *extra, "--out", str(out)], cwd=c.root,
                                env={**ENV, "PYTHONPATH": str(c.root)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    @c.case("2 corruption", "two grow processes on one --out")
    def _(tmp):
        out = tmp / "run"
        first = writer(out, "--seed", "1")
        while not (out / "stage-0.pt").exists() and first.poll() is None:
            time.sleep(0.05)
        second = c.cli("grow", *LONG, "--seed", "2", "--stages", "2",
                       *(["--overwrite"] if c.has_overwrite else []), "--out", str(out))
        met = first.poll() is None
        first.communicate()
        ok = consistent(out)
        return {"done": second, "argv": second.args[2:], "extra": {
            "first_exit": first.returncode, "met_mid_run": met, "consistent": ok,
            "corrupted": not ok or (first.returncode == 0 and second.returncode == 0)}}

    for what in ("resume", "export"):
        @c.case("2 corruption", f"{what} of a run another process is writing")
        def _(tmp, what=what):
            out = tmp / "run"
            first = writer(out)
            while not (out / "stage-0.pt").exists() and first.poll() is None:
                time.sleep(0.05)
            argv = (["grow", "--resume", str(out)] if what == "resume"
                    else ["export", str(out), "--onnx", str(tmp / "m.onnx")])
            second = c.cli(*argv)
            met = first.poll() is None
            first.communicate()
            return {"done": second, "argv": argv, "extra": {"first_exit": first.returncode, "met_mid_run": met,
                                                            "consistent": consistent(out)}}

    # ---- 3. wrong results with exit 0 -----------------------------------------------------------------
    @c.case("3 wrong results", "README: --cost lut --profile shipped --budget 0.2ms (negative latency)")
    def _(tmp):
        prof = sorted((c.root / "profiles").glob("*.json"))[0]
        return {"argv": ["grow", "--cost", "lut", "--profile", str(prof), "--budget", "0.2ms", "--stages", "1",
                         "--epochs", "1", "--limit", "200", "--out", str(tmp / "run")]}

    @c.case("3 wrong results", "all-zero profile with --cost lut")
    def _(tmp):
        return c.lut_grow_with_latency(tmp, "zero.json", 0.0, networks=True)

    @c.case("3 wrong results", "npz with one label of 50000")
    def _(tmp):
        y = np.random.default_rng(0).integers(0, 4, 40)
        y[3] = 50000
        d = c.npz_dir(tmp, y_train=y)
        return {"argv": ["grow", "--dataset", "npz", "--data-dir", str(d), *TINY, "--out", str(tmp / "run")]}

    @c.case("3 wrong results", "--budget below the seed's own cost")
    def _(tmp):
        return {"argv": ["grow", *TINY, "--budget", "100", "--out", str(tmp / "run")]}

    # ---- 4. tracebacks where one line is promised -------------------------------------------------------
    @c.case("4 tracebacks", "disk full during torch.save (real: a 40 KiB tmpfs)")
    def _(tmp):
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            return {"skip": "needs root and unshare for a tmpfs"}
        out = tmp / "full"
        out.mkdir()
        script = (f"mount -t tmpfs -o size=40k tmpfs {out} && {PY} {c.root / 'cli.py'} grow {' '.join(TINY)} "
                  f"--out {out}; rc=$?; cp -r {out} {tmp / 'after'}; exit $rc")
        p = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=c.root, env={**ENV, "PYTHONPATH": str(c.root)},
                           capture_output=True, text=True, timeout=300)
        summary = (tmp / "after" / "summary.md").read_text() if (tmp / "after" / "summary.md").exists() else ""
        records = (tmp / "after" / "stages.jsonl").read_text().splitlines() \
            if (tmp / "after" / "stages.jsonl").exists() else []
        status = next((line for line in summary.splitlines() if line.startswith("Status:")), "(no summary.md)")
        return {"done": p, "argv": ["grow", *TINY, "--out", "TMPFS_40K"],
                "extra": {"summary_status": status, "stages_kept": len(records)}}

    @c.case("4 tracebacks", "over-long --out (a 300-byte component)")
    def _(tmp):
        return {"argv": ["grow", *TINY, "--out", str(tmp / ("r" * 300))]}

    @c.case("4 tracebacks", "over-long --out (a 250-byte name: temporaries would exceed 255)")
    def _(tmp):
        return {"argv": ["grow", *TINY, "--out", str(tmp / ("r" * 250))], "ok_exit": 0}

    @c.case("4 tracebacks", "export to an over-long file name (250 bytes)")
    def _(tmp):
        run = c.run_dir(tmp)
        return {"argv": ["export", str(run), "--onnx", str(tmp / ("m" * 245 + ".onnx"))], "protect": run}

    @c.case("4 tracebacks", "a broken image in an imagefolder")
    def _(tmp):
        from PIL import Image
        for split in ("train", "val"):
            for cls in ("a", "b"):
                d = tmp / "img" / split / cls
                d.mkdir(parents=True)
                for i in range(4):
                    Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
        (tmp / "img" / "train" / "a" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        return {"argv": ["grow", "--dataset", "imagefolder", "--data-dir", str(tmp / "img"), *TINY,
                         "--out", str(tmp / "run")]}

    @c.case("4 tracebacks", '"seed": "five" in config.json on --resume')
    def _(tmp):
        run = c.run_dir(tmp)
        cfg = json.loads((run / "config.json").read_text())
        cfg["seed"] = "five"
        (run / "config.json").write_text(json.dumps(cfg))
        return {"argv": ["grow", "--resume", str(run)], "protect": run}

    @c.case("4 tracebacks", "npz with a label of 2^31-1")
    def _(tmp):
        y = np.random.default_rng(0).integers(0, 4, 40)
        y[0] = 2 ** 31 - 1
        d = c.npz_dir(tmp, y_train=y)
        return {"argv": ["grow", "--dataset", "npz", "--data-dir", str(d), *TINY, "--out", str(tmp / "run")]}

    @c.case("4 tracebacks", "a profile nested 200k levels deep")
    def _(tmp):
        (tmp / "deep.json").write_text('{"schema": ' + "[" * 200_000 + "]" * 200_000 + "}")
        return {"argv": ["grow", "--cost", "lut", "--profile", str(tmp / "deep.json"), *TINY,
                         "--out", str(tmp / "run")]}

    for res in ("100000", "0", "4096"):
        @c.case("4 tracebacks", f"summary mobilenet_v1_cifar --resolution {res}")
        def _(tmp, res=res):
            return {"argv": ["summary", "mobilenet_v1_cifar", "--resolution", res],
                    "ok_exit": 0 if res == "4096" else None}

    @c.case("4 tracebacks", "export a checkpoint with 10^6-wide layers")
    def _(tmp):
        import torch
        run = c.run_dir(tmp)
        payload = torch.load(run / "stage-1.pt", weights_only=True)
        payload["architecture"]["widths"] = [1_000_000, 38]
        torch.save(payload, run / "stage-1.pt")
        return {"argv": ["export", str(run), "--onnx", str(tmp / "m.onnx")]}

    # ---- 5. unclear messages ------------------------------------------------------------------------
    @c.case("5 messages", "degenerate profile (huge equal values: SVD)")
    def _(tmp):
        prof = json.loads(sorted((c.root / "profiles").glob("*.json"))[0].read_text())
        for r in prof["rows"]:
            r["latency_ms"] = {"median": 1e308, "p25": 1e308, "p75": 1e308, "n": 5}
        (tmp / "degenerate.json").write_text(json.dumps(prof))
        return {"argv": ["fit", str(tmp / "degenerate.json")]}

    @c.case("5 messages", "degenerate profile with grow --cost lut")
    def _(tmp):
        return c.lut_grow_with_latency(tmp, "degenerate.json", 1e308, networks=False)

    @c.case("5 messages", "a binary profile")
    def _(tmp):
        (tmp / "binary.json").write_bytes(bytes(range(256)) * 4)
        return {"argv": ["fit", str(tmp / "binary.json")]}

    @c.case("5 messages", "npz holding object arrays (numpy would advise allow_pickle)")
    def _(tmp):
        d = c.npz_dir(tmp)
        np.savez(d / "train.npz", x=np.array([{"a": 1}] * 40, dtype=object), y=np.zeros(40, dtype=int))
        return {"argv": ["grow", "--dataset", "npz", "--data-dir", str(d), *TINY, "--out", str(tmp / "run")]}

    @c.case("5 messages", "a pickled checkpoint (torch would advise weights_only=False)")
    def _(tmp):
        import pickle
        run = c.run_dir(tmp)
        with open(run / "stage-1.pt", "wb") as f:
            pickle.dump({"format": "hwsplit.checkpoint/1", "x": Path("/")}, f)
        return {"argv": ["summary", str(run / "stage-1.pt")]}

    @c.case("5 messages", "baseline width --like a baseline run")
    def _(tmp):
        base = tmp / "width"
        p = c.cli("baseline", "width", "--model", "mlp", "--multipliers", "1", "--stages", "0", "--stage-epochs",
                  "1", "--limit", "200", "--out", str(base))
        assert p.returncode == 0, p.stderr
        return {"argv": ["baseline", "width", "--like", str(base), "--out", str(tmp / "w2")], "protect": base}

    @c.case("5 messages", "permission denied on --out (run as nobody)")
    def _(tmp):
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            return {"skip": "needs root and setpriv to run as another user"}
        os.chmod(tmp, 0o755)
        d = tmp / "locked"
        d.mkdir(mode=0o755)
        return {"argv": ["grow", *TINY, "--out", str(d)],
                "prefix": ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], "cwd": Path("/tmp")}

    @c.case("5 messages", "permission denied on a run's files (resume as nobody)")
    def _(tmp):
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            return {"skip": "needs root and setpriv to run as another user"}
        os.chmod(tmp, 0o755)
        run = c.run_dir(tmp)
        return {"argv": ["grow", "--resume", str(run), "--stages", "2"], "protect": run,
                "prefix": ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], "cwd": Path("/tmp")}

    for args in (["grow", "--epochs", "0"], ["grow", "--bogus"], ["grow", "--cost", "magic"]):
        @c.case("5 messages", f"click usage error: {' '.join(args)}")
        def _(tmp, args=args):
            return {"argv": [*args, "--out", str(tmp / "run")]}

    @c.case("5 messages", "double Ctrl-C during training (7 tries)")
    def _(tmp):
        results = []
        for i in range(7):
            out = tmp / f"run{i}"
            proc = subprocess.Popen([PY, str(c.root / "cli.py"), "grow", "--model", "mlp", "--stages", "3",
                                     "--epochs", "3", "--limit", "1000", "--out", str(out)], cwd=c.root,
                                    env={**ENV, "PYTHONPATH": str(c.root)}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            while not (out / "stage-0.pt").exists() and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(0.1 * i)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.01 * i)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate()
            results.append({"exit": proc.returncode, "traceback": "Traceback" in err})
        fake = subprocess.CompletedProcess(["double-ctrl-c"], max(r["exit"] for r in results), "",
                                           "\n".join("Traceback" if r["traceback"] else "" for r in results))
        return {"done": fake, "argv": ["grow", "... (SIGINT twice, 7 times)"],
                "extra": {"tries": results, "tracebacks": sum(r["traceback"] for r in results)}, "ok_exit": 130}

    # ---- 6. minor ------------------------------------------------------------------------------------
    @c.case("6 minor", "relative --data-dir, resumed from another working directory")
    def _(tmp):
        work = tmp / "project"
        work.mkdir()
        c.npz_dir(work, name="data")
        p = c.cli("grow", "--dataset", "npz", "--data-dir", "data", *TINY, "--out", str(tmp / "run"), cwd=work)
        assert p.returncode == 0, p.stderr
        return {"argv": ["grow", "--resume", str(tmp / "run"), "--stages", "2"], "cwd": tmp, "ok_exit": 0}

    @c.case("6 minor", "--resume --stages 1 on a 3-stage run")
    def _(tmp):
        run = c.run_dir(tmp, "run", "--stages", "3")
        return {"argv": ["grow", "--resume", str(run), "--stages", "1"], "protect": run}

    @c.case("6 minor", "--budget 1e400")
    def _(tmp):
        return {"argv": ["grow", *TINY, "--budget", "1e400", "--out", str(tmp / "run")],
                "check_infinity": tmp / "run" / "config.json"}

    @c.case("6 minor", "an edited unknown model name on --resume")
    def _(tmp):
        run = c.run_dir(tmp)
        cfg = json.loads((run / "config.json").read_text())
        cfg["model"] = "resnet9000"
        (run / "config.json").write_text(json.dumps(cfg))
        return {"argv": ["grow", "--resume", str(run), "--stages", "2"], "protect": run}


def run_case(c: Cases, section: str, name: str, fn: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(dir=c.work))
    spec = fn(tmp)
    if "skip" in spec:
        return {"section": section, "case": name, "skipped": spec["skip"]}
    before = snapshot(spec.get("protect"))
    p = spec.get("done") or c.cli(*spec["argv"], cwd=spec.get("cwd"), prefix=spec.get("prefix"))
    after = snapshot(spec.get("protect"))
    lost = sorted(k for k in before if after.get(k) != before[k])
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error")]
    tail = [line for line in p.stderr.splitlines() if line.strip()]
    result = {"section": section, "case": name, "command": " ".join(str(a) for a in spec["argv"]),
              "exit": p.returncode, "traceback": "Traceback" in p.stderr, "error_lines": len(errors),
              "message": (errors[0] if errors else (tail[-1] if tail else ""))[:400], "lost": lost}
    if "check_infinity" in spec and spec["check_infinity"].exists():
        result["infinity_in_config"] = "Infinity" in spec["check_infinity"].read_text()
    result.update(spec.get("extra", {}))
    ok_exit = spec.get("ok_exit")
    result["expected_exit"] = ok_exit if ok_exit is not None else "1 or 2"
    return result


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not run"
    if "skipped" in r or "setup_failed" in r:
        return r.get("skipped") or f"set-up failed: {r['setup_failed'][:60]}"
    bits = [f"exit {r['exit']}"]
    if r["traceback"]:
        bits.append("**traceback**")
    if r["lost"]:
        bits.append(f"**lost {len(r['lost'])} file(s)**")
    if r.get("corrupted"):
        bits.append("**mixed run**")
    if r.get("infinity_in_config"):
        bits.append("**Infinity in config.json**")
    if "tracebacks" in r:
        bits.append(f"{r['tracebacks']}/7 tracebacks")
    msg = r["message"].replace("|", "/").replace(str(Path(tempfile.gettempdir())), "")
    return ", ".join(bits) + (f": {msg[:140]}" if msg else "")


def table(before: Path, after: Path) -> str:
    """A markdown table of the cases, before and after."""
    b = {r["case"]: r for r in json.loads(before.read_text())["cases"]}
    rows = ["| # | case | before | after |", "|---|---|---|---|"]
    for i, r in enumerate(json.loads(after.read_text())["cases"], 1):
        rows.append(f"| {i} | {r['section']}: {r['case']} | {_cell(b.get(r['case']))} | {_cell(r)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                        help="print the markdown table of two result files and stop")
    parser.add_argument("--root", default=str(HERE), help="checkout whose cli.py is run")
    parser.add_argument("--label", default="after")
    parser.add_argument("--only", default=None, help="run only cases whose name matches this regular expression")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the cases run in an existing result file (others are kept)")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.table[0]), Path(args.table[1])))
        return
    root = Path(args.root).resolve()
    out = HERE / "bench" / "results" / f"issue10_cases_{args.label}.json"
    work = Path(tempfile.mkdtemp(prefix="issue10-"))
    os.chmod(work, 0o755)
    c = Cases(root, work)
    define(c)
    results = []
    t0 = time.time()
    try:
        for section, name, fn in c.cases:
            if args.only and not re.search(args.only, name):
                continue
            try:
                r = run_case(c, section, name, fn)
            except Exception as err:  # a case whose set-up failed is recorded, not fatal
                r = {"section": section, "case": name, "setup_failed": f"{type(err).__name__}: {err}"[:400]}
            r = json.loads(json.dumps(r).replace(str(work), "WORK"))  # the scratch folder's name is this machine's
            results.append(r)
            print(json.dumps(r)[:300], flush=True)
            _write(out, root, args.label, t0, results, merge=args.merge)  # after every case: resumable by hand
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}")


def _write(out: Path, root: Path, label: str, t0: float, results: list[dict[str, Any]], *, merge: bool) -> None:
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    cases = results
    if merge and out.exists():
        new = {r["case"]: r for r in results}
        old = json.loads(out.read_text())["cases"]
        cases = [new.pop(r["case"], r) for r in old] + list(new.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"root": root.name if root != HERE else ".", "commit": git.stdout.strip(), "label": label,
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "wall_s": round(time.time() - t0, 1), "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
