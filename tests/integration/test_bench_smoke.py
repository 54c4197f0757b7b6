"""The benchmark scripts still run end to end (tiny workloads); they check no speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import API_KEY, CLUSTER_TOKEN, MODEL_NAME, Stack, free_port

# Past the default 600 s: a bench run may take up to its own 900 s timeout (routing_bench.py
# installs vLLM's router in a venv on first use).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1000)]
BENCH_DIR = Path(__file__).parents[2] / "bench"
BENCH = BENCH_DIR / "serve_bench.py"


def test_serve_bench_smoke_writes_both_sides(stack: Stack, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--gateway-url", stack.gateway_url,
         "--controller-url", stack.controller_url, "--gateway-key", API_KEY,
         "--tokenizer", str(stack.model_path), "--out", str(tmp_path), "--label", "smoke"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "FLEET_CLUSTER_TOKEN": CLUSTER_TOKEN},
    )
    check_serve_smoke(result, tmp_path)


def check_serve_smoke(result: subprocess.CompletedProcess[str], out: Path) -> None:
    """A `serve_bench.py --smoke` run wrote both sides, each with its 4 requests done."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = out.glob("serve-smoke-*.json")
    record = json.loads(path.read_text())
    for side in ("direct", "gateway"):
        assert record[side]["completed"] == 4 and record[side]["failed"] == 0
    assert record["summary"]["throughput_ratio"] > 0


def _smoke(script: str, tmp_path: Path, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), "--smoke", "--out", str(tmp_path),
         "--label", "smoke", *args],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = tmp_path.glob("*-smoke-*.json")
    return json.loads(path.read_text())


def test_routing_bench_smoke_runs_ours_and_vllms_router(tmp_path: Path) -> None:
    """Two CPU workers; our cache-aware gateways (this checkout's, and another tree's as a
    before/after run gives it), and vLLM's router (installed in its own venv on first use),
    two replicas each, over the same engines: each policy twice in a closed loop (A-B-B-A),
    then twice in an open loop."""
    policies = ("cache-aware", "cache-aware~here", "vllm-router:cache_aware")
    record = _smoke("routing_bench.py", tmp_path, "--policies", ",".join(policies),
                    "--tree", f"here={BENCH_DIR.parent}")
    runs = record["shapes"]["base"]["runs"]
    assert [(r["mode"], r["policy"]) for r in runs] == [
        (mode, p) for mode in ("closed", "open") for p in (*policies, *policies[::-1])]
    for run in runs:
        assert run["errors"] == 0 and 0 <= run["prefix_cache_hit_rate"] <= 1, run
        assert run["requests"] == 8 if run["mode"] == "closed" else run["steady_requests"] > 0
    summary = record["shapes"]["base"]["summary"]
    assert set(summary["open"]) == set(policies) and summary["open"]["cache-aware"]["rate"] > 0


def test_routing_ceiling_smoke_bounds_round_robin_by_the_best(tmp_path: Path) -> None:
    """No engine: the demo model's tokenizer over the routing bench's load shapes."""
    record = _smoke("routing_ceiling.py", tmp_path)
    assert set(record["shapes"]) == {"base", "long", "many", "busy"}
    for rates in record["shapes"].values():
        assert 0 < rates["round_robin"] < rates["best"] < 1 and rates["queried_tokens"] > 0


def test_overhead_bench_smoke_measures_every_proxy(tmp_path: Path) -> None:
    """The fake backend directly, our gateway, vLLM's router and LiteLLM (peers in their own
    venvs, installed on first use)."""
    record = _smoke("overhead_bench.py", tmp_path)
    results = record["results"]
    assert results["direct"]["20.0"]["errors"] == 0, results["direct"]
    for proxy in ("fleet", "vllm-router", "litellm"):
        log = Path(record["logs"]) / f"{proxy}.log"
        assert results[proxy]["20.0"]["errors"] == 0, \
            (proxy, results[proxy], log.read_text()[-3000:] if log.exists() else "no log")
        assert results[proxy]["20.0"]["cpu_ms_per_1k"] >= 0
        assert results[proxy]["max"]["req_per_s"] > 0


def test_overhead_interleaved_runs_every_gateway_in_turn(tmp_path: Path) -> None:
    """Issue 18's before/after check: two checkouts' gateways (here the same one twice), the
    bare relays (uvicorn's, and granian's from its peer venv) and vLLM's router up at once, the
    load A B C ... C B A, CPU per stream for each run."""
    root = BENCH_DIR.parent
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / "overhead_interleaved.py"), "--tree", f"a={root}",
         "--tree", f"b={root}", "--bare", "uvicorn,granian", "--router", "--rates", "50",
         "--duration", "1", "--rounds", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = tmp_path.glob("overhead-interleaved-*.json")
    runs = json.loads(path.read_text())["results"]["50"]
    assert set(runs) == {"a", "b", "bare-uvicorn", "bare-granian", "vllm-router"}
    for name, measured in runs.items():
        assert len(measured) == 2, name  # there and back
        for run in measured:
            assert run["errors"] == 0 and run["requests"] > 0, run
            # CPU is counted in clock ticks: a second of the router's light load may be none.
            assert run["cpu_ms_per_1k"] > 0 if name in ("a", "b") else \
                run["cpu_ms_per_1k"] >= 0, run


def test_scale_bench_smoke_two_workers_then_the_report(tmp_path: Path) -> None:
    """`fleet up` with two CPU workers, one core each: both engines serve, and the report reads
    the record back."""
    urls = [f"--gateway-url=http://127.0.0.1:{free_port()}",
            f"--controller-url=http://127.0.0.1:{free_port()}"]
    record = _smoke("scale_bench.py", tmp_path, "--layout", "per-cpu", *urls, "--up-args",
                    "--cpu-workers 2 --cpus 0-1 --no-webui --max-model-len 2048")
    assert record["workers"] == 2 and record["devices"] == ["cpu:0", "cpu:1"]
    assert record["result"]["completed"] == 8 and record["result"]["failed"] == 0
    # The engines' own counters: the 8 measured requests, and each engine had some.
    by_device = record["requests_by_device"]
    assert sum(by_device.values()) == 8 and all(n > 0 for n in by_device.values()), by_device
    report = subprocess.run([sys.executable, str(BENCH_DIR / "scale_bench.py"), "--report",
                             str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "| per-cpu | 2 (cpu:0, cpu:1) | 4 |" in report.stdout


def test_controller_bench_smoke_follows_the_table_by_changes(tmp_path: Path) -> None:
    """Simulated workers and gateways; the gateways' tables, built from changes alone, end
    equal to the controller's snapshot."""
    record = _smoke("controller_bench.py", tmp_path)
    result = record["result"]
    assert result["gateway_tables_match_snapshot"]
    # Every simulated worker beat on schedule (within one beat of the window's edges).
    assert abs(result["heartbeats_per_s"] - record["setup"]["workers"] / 2.0) <= 1
    assert result["sync"]["reads"] > 0 and result["sync"]["full_reads"] == 2


def test_tokenize_bench_smoke_measures_both_loads(tmp_path: Path) -> None:
    """No engine: the demo model's tokenizer, a new and a shared system prompt."""
    record = _smoke("tokenize_bench.py", tmp_path)
    for load in ("fresh", "shared"):
        assert record["cpu_ms_per_request"][load]["total_ms"]["p50"] > 0
    assert record["requests"] == 10 and record["prompt_tokens_mean"] > 100


def test_engine_auth_bench_smoke_measures_the_door_both_ways(tmp_path: Path) -> None:
    """Issue 20's bench: the door in process and end to end (uvicorn apps, bare and behind
    the door); every streamed request got through it."""
    record = _smoke("engine_auth_bench.py", tmp_path)
    assert record["in_process"]["guarded_us"] > 0 and record["in_process"]["bare_us"] > 0
    runs = record["end_to_end"]["runs"]
    assert set(runs) == {"bare", "guarded"}
    for side, measured in runs.items():
        assert len(measured) == 2, side  # A-B-B-A
        for run in measured:
            assert run["errors"] == 0 and run["requests"] > 0, (side, run)
    assert record["summary"]["gateway_cpu_ms_per_1k"] > 0


def test_shared_state_bench_smoke_exchanges_through_a_real_redis(tmp_path: Path) -> None:
    """Issue 23's store bench, on Debian's redis-server: admits and exchanges measured, and
    each gateway saw the others' in-flight counts as they were sent."""
    result = _smoke("shared_state_bench.py", tmp_path)["result"]
    assert result["peer_inflight_seen_equals_sent"] is True
    assert result["admits_per_s"] > 0 and result["admit_ms"]["p50"] > 0
    assert result["exchange_ms"]["p50"] > 0


def test_kv_relay_bench_smoke_sees_every_prompt_both_ways(tmp_path: Path) -> None:
    """Issue 23's relay bench: one real worker; each prompt's blocks reached the direct ZMQ
    subscriber and the gateway's view of the worker's /kv-cache."""
    record = _smoke("kv_relay_bench.py", tmp_path)
    assert len(record["rows"]) == record["requests"] == 3
    for row in record["rows"]:
        assert row["direct_bytes"] > 0 and row["relay_bytes"] > 0, row
    assert record["tokenizer_bytes"] > 0


def test_seam_bench_smoke_continues_the_killed_workers_streams(tmp_path: Path) -> None:
    """Issue 21's bench: two real workers, a round without a fault and one killing the worker
    that carries most streams; its streams go on on the other worker and all end with [DONE]."""
    record = _smoke("seam_bench.py", tmp_path)
    (round_,) = record["rounds"]
    assert all(s["done"] for s in round_["baseline"]["streams"]), round_["baseline"]
    fault = round_["fault"]
    continued = [s for s in fault["streams"] if s["continued"]]
    assert fault["killed"] and continued, fault
    assert all(s["done"] for s in fault["streams"]), fault
    assert all(s["longest_gap_ms"] > 0 for s in continued), continued


def test_lora_bench_smoke_places_adapters_both_ways(tmp_path: Path) -> None:
    """Two CPU workers with 2 adapter slots each and 3 adapters declared: demand placement and
    naive placement each serve the whole Zipf sequence, and the gateway counts its loads. The
    adapters are written from the model's config and the workers started one after the other,
    as on the GPU (bench/gpu.sh lora), where the model has no weights for peft to wrap."""
    record = _smoke("lora_bench.py", tmp_path, "--adapters-from-config", "--sequential-start")
    assert record["workload"]["adapters_from_config"] is True
    runs = {run["side"]: run for run in record["runs"]}
    assert set(runs) == {"demand", "naive"}
    for run in runs.values():
        assert run["ok"] == run["requests"] == 8 and not run["errors"], run
        # All were unloaded before the measured run: its first requests loaded theirs.
        assert run["adapter_loads"] >= 1


def test_wakeup_cost_measures_both_cases() -> None:
    """The write that wakes a sleeping reader, and the same back to back, each timed."""
    result = subprocess.run([sys.executable, str(BENCH_DIR / "wakeup_cost.py"), "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("one write")]
    assert len(lines) == 2 and "asleep" in lines[0] and "back to back" in lines[1]
    for line in lines:
        cpu = float(line.split("CPU ")[1].split(" us")[0])
        assert cpu > 0


def test_prefill_learning_smoke_reads_what_the_worker_learned(stack: Stack,
                                                              tmp_path: Path) -> None:
    """A cold burst, then a cached one, through the running stack: after each, the worker's
    learned prefill speed and work per request (the engine's counters, through heartbeats)."""
    result = subprocess.run(
        [sys.executable, str(BENCH_DIR / "prefill_learning.py"), "--smoke",
         "--gateway-url", stack.gateway_url, "--controller-url", stack.controller_url,
         "--api-key", API_KEY, "--model", MODEL_NAME, "--out", str(tmp_path),
         "--label", "smoke"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "FLEET_CLUSTER_TOKEN": CLUSTER_TOKEN},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = tmp_path.glob("prefill-learning-smoke-*.json")
    bursts = json.loads(path.read_text())["bursts"]
    assert [b["burst"] for b in bursts] == ["before", "cold", "cached"]
    for b in bursts[1:]:
        assert b["seconds"] > 0
        ((speed, per_request),) = b["learned"].values()  # the stack's one worker
        assert speed > 0 and per_request > 0, bursts
