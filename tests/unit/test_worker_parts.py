"""Worker pieces: the engine command, load parsing, model sources and settings."""

import asyncio
from pathlib import Path

import pytest

from worker import model_source
from worker.engine import ENGINE_MODULE, GUARD_MODULE, EngineFailed, build_engine_command
from worker.load import parse_load
from worker.settings import ModelSource, WorkerSettings


def command(**kw):
    args = dict(model_path="/m", served_names=["m"], host="127.0.0.1", port=9000,
                api_key="k", gpus=None, cpus=None, cpu_kvcache_gib=1, extra_args=[],
                base_env={"PATH": "/bin"}, python="py")
    args.update(kw)
    return build_engine_command(**args)


def test_engine_is_vllms_openai_server_with_our_key_and_port() -> None:
    cmd = command(api_key="sk-engine-key")
    assert cmd.argv[:8] == ["py", "-m", GUARD_MODULE, "--", "py", "-m", ENGINE_MODULE, "--model"]
    assert cmd.argv[cmd.argv.index("--port") + 1] == "9000"
    assert cmd.base_url == "http://127.0.0.1:9000"
    # The key is in the environment: any local user can read a command line, and vLLM logs
    # its arguments.
    assert cmd.env["VLLM_API_KEY"] == "sk-engine-key"
    assert not any("sk-engine-key" in a or a.startswith("--api-key") for a in cmd.argv)


def test_the_engine_moves_to_another_port_only_its_api_port() -> None:
    cmd = command(extra_args=["--kv-events-config", '{"endpoint":"tcp://*:9000"}',
                              "--port-range", "9000"])
    moved = cmd.on_port(9100)
    assert moved.base_url == "http://127.0.0.1:9100" and moved.env is cmd.env
    assert [i for i, (a, b) in enumerate(zip(cmd.argv, moved.argv, strict=True)) if a != b] \
        == [cmd.argv.index("--port") + 1]


@pytest.mark.parametrize(("tail", "taken"), [
    (["OSError: [Errno 98] Address already in use"], True),  # vLLM's own bind
    (["ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 9000): "
      "address already in use"], True),  # uvicorn's
    (["zmq.error.ZMQError: Address already in use (addr='tcp://*:5557')"], False),
    (["torch.OutOfMemoryError: CUDA out of memory"], False),
])
def test_an_engine_failure_tells_whether_its_port_was_taken(tail: list[str], taken: bool) -> None:
    assert EngineFailed("engine exited", tail).port_taken is taken


def test_the_engine_inherits_no_cluster_token() -> None:
    env = {"PATH": "/bin", "FLEET_CLUSTER_TOKEN": "c" * 20, "FLEET_READ_TOKEN": "r" * 20}
    cmd = command(base_env=env)
    assert "FLEET_CLUSTER_TOKEN" not in cmd.env and "FLEET_READ_TOKEN" not in cmd.env
    assert cmd.env["PATH"] == "/bin"


def test_engine_serves_https_with_the_workers_certificate() -> None:
    cmd = command(ssl_certfile="/tls/cert.pem", ssl_keyfile="/tls/key.pem")
    assert cmd.argv[cmd.argv.index("--ssl-certfile") + 1] == "/tls/cert.pem"
    assert cmd.argv[cmd.argv.index("--ssl-keyfile") + 1] == "/tls/key.pem"
    assert cmd.base_url == "https://127.0.0.1:9000"
    assert "--ssl-certfile" not in command().argv


def test_one_gpu_pins_cuda_visible_devices() -> None:
    cmd = command(gpus="3")
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "3"
    assert "--tensor-parallel-size" not in cmd.argv
    assert "VLLM_CPU_KVCACHE_SPACE" not in cmd.env


def test_several_gpus_mean_tensor_parallel() -> None:
    cmd = command(gpus="0,1")
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert cmd.argv[cmd.argv.index("--tensor-parallel-size") + 1] == "2"


def test_explicit_tensor_parallel_size_is_kept() -> None:
    cmd = command(gpus="0,1,2,3", extra_args=["--tensor-parallel-size=2"])
    assert cmd.argv.count("--tensor-parallel-size") == 0
    assert "--tensor-parallel-size=2" in cmd.argv


def test_cpu_cores_bind_threads_and_size_the_kv_cache() -> None:
    cmd = command(cpus="0-1", cpu_kvcache_gib=2)
    assert cmd.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert cmd.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "CUDA_VISIBLE_DEVICES" not in cmd.env


def test_users_kv_cache_setting_wins() -> None:
    cmd = command(base_env={"VLLM_CPU_KVCACHE_SPACE": "7"})
    assert cmd.env["VLLM_CPU_KVCACHE_SPACE"] == "7"


def test_wildcard_bind_is_reached_on_loopback() -> None:
    assert command(host="0.0.0.0").base_url == "http://127.0.0.1:9000"


def test_unknown_flags_pass_through_to_the_engine() -> None:
    settings = WorkerSettings.from_cli(
        ["--model", "/m", "--cpus", "0", "--max-model-len", "2048", "--enforce-eager"]
    )
    assert settings.engine_args == ["--max-model-len", "2048", "--enforce-eager"]
    assert settings.device == "cpu:0"


def test_prefix_of_a_worker_flag_is_not_swallowed() -> None:
    settings = WorkerSettings.from_cli(["--model", "/m", "--model-impl", "vllm"])
    assert settings.engine_args == ["--model-impl", "vllm"]


def test_bad_device_list_is_refused() -> None:
    with pytest.raises(ValueError):
        WorkerSettings(model="/m", gpus="zero")


METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
"""


def test_load_sums_engines_and_takes_the_fullest_cache() -> None:
    load = parse_load(METRICS)
    assert (load.running, load.waiting, load.kv_cache_usage) == (4, 2, 0.5)


def test_load_of_an_engine_without_those_metrics_is_zero() -> None:
    load = parse_load("# nothing here\n")
    assert (load.running, load.waiting, load.kv_cache_usage) == (0, 0, 0.0)


# As vLLM 0.32 writes it: one series per set of adapters seen, its value the last time seen.
LORA_METRICS = """\
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters=""} 1000.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="b",waiting_lora_adapters="c"} 1010.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 990.0
"""


def test_load_names_the_adapters_of_the_engines_newest_step() -> None:
    assert parse_load(LORA_METRICS, now=1012.0).busy_adapters == ["b", "c"]


def test_an_engine_idle_since_its_last_lora_step_has_no_busy_adapter() -> None:
    """The gauge keeps its last set after the last step: once stale, nothing runs."""
    assert parse_load(LORA_METRICS, now=1010.0 + 60).busy_adapters == []
    assert parse_load(METRICS).busy_adapters == []  # no LoRA at all


def test_a_heartbeat_without_busy_adapters_carries_no_such_field() -> None:
    """A controller from before the field (which forbids unknown fields) still takes it."""
    assert "busy_adapters" not in parse_load(METRICS).model_dump_json(exclude_defaults=True)


def test_local_model_is_served_under_its_folder_name(tmp_path: Path) -> None:
    folder = tmp_path / "Tiny-1B"
    folder.mkdir()
    settings = WorkerSettings(model=str(folder))
    assert model_source.served_names(settings) == ["Tiny-1B"]
    path, extra = asyncio.run(model_source.resolve_model(settings))
    assert path == str(folder) and extra == []


def test_hf_id_is_left_to_vllm_with_the_download_dir(tmp_path: Path) -> None:
    settings = WorkerSettings(model="org/some-model", download_dir=tmp_path)
    assert model_source.served_names(settings) == ["org/some-model"]
    path, extra = asyncio.run(model_source.resolve_model(settings))
    assert path == "org/some-model" and extra == ["--download-dir", str(tmp_path)]


@pytest.mark.parametrize("settings_kw, env", [
    ({"source": ModelSource.MODELSCOPE}, {}),
    ({}, {"VLLM_USE_MODELSCOPE": "True"}),
])
def test_modelscope_ids_are_downloaded_with_snapshot_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, settings_kw: dict, env: dict
) -> None:
    calls = []

    def fake_download(model_id: str, cache_dir: Path | None) -> str:
        calls.append((model_id, cache_dir))
        return str(tmp_path / "qwen")

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(model_source, "_modelscope_download", fake_download)
    settings = WorkerSettings(model="qwen/Qwen-7B-Chat", download_dir=tmp_path, **settings_kw)
    path, extra = asyncio.run(model_source.resolve_model(settings))
    assert calls == [("qwen/Qwen-7B-Chat", tmp_path)]
    assert path == str(tmp_path / "qwen") and extra == []


def test_a_key_that_starts_with_a_dash_is_no_flag() -> None:
    cmd = command(api_key="-abc")
    assert cmd.env["VLLM_API_KEY"] == "-abc" and "-abc" not in cmd.argv


def test_engine_key_is_fresh_per_worker_unless_set_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.service import Worker

    first = Worker(WorkerSettings.from_cli(["--model", "m"]))
    second = Worker(WorkerSettings.from_cli(["--model", "m"]))
    assert first.engine_api_key != second.engine_api_key
    monkeypatch.setenv("FLEET_WORKER_ENGINE_API_KEY", "k" * 32)
    assert Worker(WorkerSettings.from_cli(["--model", "m"])).engine_api_key == "k" * 32
    monkeypatch.setenv("FLEET_WORKER_ENGINE_API_KEY", "short")
    with pytest.raises(ValueError):
        WorkerSettings.from_cli(["--model", "m"])


def test_chat_template_is_the_workers_flag_not_the_engines() -> None:
    settings = WorkerSettings.from_cli(["--model", "m", "--chat-template", "chatml",
                                        "--max-model-len", "8"])
    assert settings.chat_template == "chatml"
    assert settings.engine_args == ["--max-model-len", "8"]


def test_a_missing_template_file_stops_the_worker(tmp_path: Path) -> None:
    from worker.service import Worker

    worker = Worker(WorkerSettings(model="m", chat_template=str(tmp_path / "none.jinja")))
    with pytest.raises(FileNotFoundError, match="none.jinja"):
        asyncio.run(worker._template_files("m", tmp_path))
