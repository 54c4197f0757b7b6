"""The fleet file: what it accepts, what it refuses and how, and the services `fleet up` plans
from it (the demo fleet, and a two-model file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.devices import share_cores, share_gpus
from fleet.fleet_file import (
    FleetFile,
    FleetFileError,
    FleetModel,
    demo_fleet_path,
    load_fleet,
    parse_fleet,
    resolve_demo_sources,
)
from fleet.launcher import UpSettings, fleet_of, plan, served_as

TOKEN = "t" * 32

TWO_MODELS = """
models:
  - source: Qwen/Qwen2.5-0.5B-Instruct
    served_names: [qwen, default]
    engine_args: [--max-model-len, 4096]
    chat_template: chatml
  - name: embedder
    source: local:/models/bge-small
    workers: 2
    engine_args: [--runner, pooling]
"""


def _fake_demo(name: str) -> tuple[Path, str]:
    return Path(f"/cache/{name}"), {"smollm2": "SmolLM2-135M-Instruct",
                                    "all-minilm-l6-v2": "all-MiniLM-L6-v2"}[name]


def _no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(count))))


def _flag(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def _workers(argv: list[str], fleet: FleetFile) -> list[list[str]]:
    args = UpSettings.from_cli(["--no-webui", *argv])
    return [s.argv for s in plan(args, fleet, TOKEN) if s.name.startswith("worker-")]


# -- parsing and validation -----------------------------------------------------------------

def test_a_two_model_file_parses_with_its_defaults() -> None:
    fleet = parse_fleet(TWO_MODELS)
    qwen, embedder = fleet.models
    assert (qwen.label, qwen.prefix, qwen.location) == ("qwen", None, "Qwen/Qwen2.5-0.5B-Instruct")
    assert qwen.engine_args == ["--max-model-len", "4096"]  # the YAML int is a flag's text
    assert qwen.workers is None and qwen.gpus_per_worker == 1
    assert (embedder.label, embedder.prefix, embedder.location) == (
        "embedder", "local", "/models/bge-small")


@pytest.mark.parametrize("text, message", [
    ("models: [", "is not valid YAML"),
    ("- source: x", "must be a mapping with a 'models' list"),
    ("models: []", "models: List should have at least 1 item"),
    ("models:\n  - served_names: [a]", "models[0].source: missing"),
    ("models:\n  - source: a\n    gpu: [0]", "models[0].gpu: unknown key"),
    ("modles:\n  - source: a", "modles: unknown key"),
    ("models:\n  - source: a\n  - source: b\n    workers: 0",
     "models[1].workers: Input should be greater than or equal to 1"),
    ("models:\n  - source: a\n  - source: a", "two models are called a; give each a name"),
])
def test_a_bad_file_is_refused_saying_where(text: str, message: str) -> None:
    with pytest.raises(FleetFileError, match="^fleet.yaml") as caught:
        parse_fleet(text, "fleet.yaml")
    assert message in str(caught.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FleetFileError, match=f"cannot read the fleet file {tmp_path}/nope.yaml"):
        load_fleet(tmp_path / "nope.yaml")


def test_local_paths_and_templates_are_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("models:\n  - source: local:models/m\n    chat_template: t.jinja\n"
                    "  - source: org/id\n    chat_template: chatml\n")
    mine, hub = load_fleet(path).models
    assert mine.source == f"local:{tmp_path}/models/m"
    assert mine.chat_template == f"{tmp_path}/t.jinja"
    assert (hub.source, hub.chat_template) == ("org/id", "chatml")


# -- which fleet `fleet up` serves ------------------------------------------------------------

def test_with_neither_fleet_nor_model_it_is_the_demo_fleet() -> None:
    fleet = fleet_of(UpSettings.from_cli([]), on_gpus=False)
    assert fleet == load_fleet(demo_fleet_path())
    assert [m.source for m in fleet.models] == ["demo:smollm2", "demo:all-minilm-l6-v2"]


def test_cpu_workers_without_a_model_keeps_meaning_the_chat_demo_model() -> None:
    (model,) = fleet_of(UpSettings.from_cli(["--cpu-workers", "2"]), on_gpus=False).models
    assert (model.source, model.workers) == ("demo:smollm2", 2)


def test_one_model_flags_are_refused_beside_a_fleet_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(TWO_MODELS)
    args = UpSettings.from_cli(["--fleet", str(path), "--model-name", "x"])
    with pytest.raises(ValueError, match="--model-name describes --model; with --fleet"):
        fleet_of(args, on_gpus=False)
    with pytest.raises(SystemExit):  # argparse: not allowed with
        UpSettings.from_cli(["--fleet", str(path), "--model", "m"])
    monkeypatch.setenv("FLEET_UP_MODEL", "m")
    with pytest.raises(ValueError, match="give --fleet or --model, not both"):
        fleet_of(UpSettings.from_cli(["--fleet", str(path)]), on_gpus=False)


def test_demo_sources_become_the_local_folders_under_their_names() -> None:
    fleet = resolve_demo_sources(load_fleet(demo_fleet_path()), _fake_demo)
    chat, embed = fleet.models
    assert (chat.source, chat.served_names) == ("local:/cache/smollm2", ["SmolLM2-135M-Instruct"])
    assert (embed.source, embed.served_names) == ("local:/cache/all-minilm-l6-v2",
                                                  ["all-MiniLM-L6-v2"])
    assert [served_as(m) for m in fleet.models] == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"]


# -- plans --------------------------------------------------------------------------------------

def test_the_demo_fleet_on_two_cores_gives_each_model_one(monkeypatch) -> None:
    _no_gpus(monkeypatch)
    fleet = resolve_demo_sources(load_fleet(demo_fleet_path()), _fake_demo)
    chat, embed = _workers(["--cpus", "0-1", "--max-model-len", "512"], fleet)
    assert _flag(chat, "--model") == ["/cache/smollm2"] and _flag(chat, "--source") == ["local"]
    assert _flag(chat, "--cpus") == ["0"] and _flag(embed, "--cpus") == ["1"]
    assert _flag(chat, "--model-name") == ["SmolLM2-135M-Instruct"]
    assert _flag(embed, "--model-name") == ["all-MiniLM-L6-v2"]
    assert "--runner" not in chat
    # The model's engine arguments, then the command line's, which win.
    assert embed[-4:] == ["--runner", "pooling", "--max-model-len", "512"]
    assert "--enforce-eager" in embed


def test_a_two_model_file_on_cpu_shares_the_cores_per_worker(monkeypatch) -> None:
    _no_gpus(monkeypatch)
    qwen, embed_0, embed_1 = _workers(["--cpus", "0-5"], parse_fleet(TWO_MODELS))
    assert [_flag(w, "--cpus") for w in (qwen, embed_0, embed_1)] == [["0-1"], ["2-3"], ["4-5"]]
    assert _flag(qwen, "--model-name") == ["qwen", "default"]
    assert _flag(qwen, "--chat-template") == ["chatml"] and "--source" not in qwen
    assert qwen[-2:] == ["--max-model-len", "4096"]
    for embed in (embed_0, embed_1):
        assert _flag(embed, "--model") == ["/models/bge-small"]
        assert _flag(embed, "--source") == ["local"]
        assert embed[-2:] == ["--runner", "pooling"]
        assert "--model-name" not in embed and "--chat-template" not in embed


def test_more_workers_than_cores_is_refused_as_split_cores_says(monkeypatch) -> None:
    _no_gpus(monkeypatch)
    with pytest.raises(ValueError, match="3 CPU workers need at least 3 cores; this machine "
                                         "lets us use 2"):
        _workers(["--cpus", "0-1"], parse_fleet(TWO_MODELS))


def test_a_two_model_file_on_gpus_shares_them_in_file_order(monkeypatch) -> None:
    _gpus(monkeypatch, 4)
    qwen_0, qwen_1, embed_0, embed_1 = _workers([], parse_fleet(TWO_MODELS))
    # The embedder asked for 2 workers; the qwen model, asking for none, gets what is left.
    assert [_flag(w, "--gpus") for w in (qwen_0, qwen_1, embed_0, embed_1)] == [
        ["0"], ["1"], ["2"], ["3"]]
    assert "--enforce-eager" not in qwen_0 and "--cpus" not in embed_0


def test_gpus_listed_and_tensor_parallel() -> None:
    fleet = parse_fleet("models:\n  - source: big\n    gpus: [2, 3]\n    gpus_per_worker: 2\n"
                        "  - source: small\n  - source: other\n    workers: 1\n")
    # In file order: 'small' (no count) gets what 'other' (one worker) leaves of 0, 1, 4.
    assert share_gpus(fleet.models, ["0", "1", "2", "3", "4"]) == [["2,3"], ["0", "1"], ["4"]]


@pytest.mark.parametrize("text, gpus, message", [
    ("models:\n  - source: a\n    gpus: [7]", ["0"], "lists GPU 7, which is not visible"),
    ("models:\n  - source: a\n    workers: 3", ["0", "1"], "the models need 3 GPUs"),
    ("models:\n  - source: a\n    gpus_per_worker: 2", ["0"], "gets no GPU"),
    ("models:\n  - source: a\n    gpus: [0]\n  - source: b\n    gpus: [0]", ["0", "1"],
     "two models list the same GPU"),
])
def test_gpu_requests_that_do_not_fit_are_refused(text: str, gpus: list[str],
                                                   message: str) -> None:
    with pytest.raises(ValueError, match=message):
        share_gpus(parse_fleet(text).models, gpus)


def test_cores_a_model_lists_are_its_own() -> None:
    fleet = parse_fleet("models:\n  - source: a\n    cpus: 2-3\n    workers: 2\n"
                        "  - source: b\n")
    assert share_cores(fleet.models, [0, 1, 2, 3]) == [["2", "3"], ["0-1"]]
    with pytest.raises(ValueError, match="lists cores 2-3; this machine lets us use 0-1"):
        share_cores(fleet.models, [0, 1])
    with pytest.raises(ValueError, match="lists GPUs, but no GPU is visible"):
        share_cores([FleetModel(source="a", gpus=["0"])], [0])


def test_the_demo_fleet_ships_with_the_package() -> None:
    setup_cfg = (Path(__file__).resolve().parents[2] / "setup.cfg").read_text()
    assert demo_fleet_path().is_file()
    assert "fleet = demo_fleet.yaml" in setup_cfg  # in the wheel too, not only the checkout


def test_adapters_turn_lora_on_and_are_declared_for_the_fleet(tmp_path: Path,
                                                              monkeypatch) -> None:
    from controller.adapters import AdapterCatalogue
    from fleet.launcher import UpSettings, adapters_file, declare_fleet_adapters, plan

    (tmp_path / "adapters" / "sql").mkdir(parents=True)
    path = tmp_path / "fleet.yaml"
    path.write_text("models:\n  - source: /models/m\n    served_names: [m]\n"
                    "    adapters: [{name: sql, source: adapters/sql},\n"
                    "               {name: hub, source: org/x}]\n"
                    "  - source: /models/e\n    max_loras: 4\n"
                    "  - source: /models/plain\n")
    fleet = load_fleet(path)
    with_adapters, with_slots, plain = fleet.models
    assert with_adapters.lora_args == ["--enable-lora", "--max-loras", "2"]
    assert with_slots.lora_args == ["--enable-lora", "--max-loras", "4"]
    assert plain.lora_args == []
    assert with_adapters.adapters[0].source == str(tmp_path / "adapters" / "sql")
    assert with_adapters.adapters[1].source == "org/x"  # not a folder here: a hub id
    args = UpSettings.from_cli(["--fleet", str(path), "--no-webui", "--cpus", "0-2",
                                "--adapters-file", str(tmp_path / "state.json")])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    services = plan(args, fleet, "t" * 32)
    controller = services[0].argv
    assert controller[controller.index("--adapters-file") + 1] == str(tmp_path / "state.json")
    assert "--enable-lora" in services[1].argv and "--enable-lora" not in services[3].argv
    assert declare_fleet_adapters(adapters_file(args), fleet) == 2
    catalogue = AdapterCatalogue(tmp_path / "state.json")
    assert [(a.name, a.base_model) for a in catalogue.list()] == [("hub", "m"), ("sql", "m")]


def test_two_adapters_of_one_name_are_refused() -> None:
    with pytest.raises(FleetFileError, match="two adapters are called a"):
        parse_fleet("models:\n  - source: x\n    adapters: [{name: a, source: p}]\n"
                    "  - source: y\n    adapters: [{name: a, source: q}]\n")
