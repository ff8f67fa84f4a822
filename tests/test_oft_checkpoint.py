"""OpenVLA-OFT checkpoint directories: the offline .pt -> safetensors conversion and the loader.

Proves: the conversion reads upstream's files through torch.load(weights_only=True) only: a pickle that
would run code (a custom class's __reduce__) is refused and the code never runs; anything but a flat dict
of tensors is refused; DDP's `module.` prefix is stripped; the safetensors hold the same tensors, record
the source's sha256, and oft_config.json the chunk / images / normalisation. The loader never opens a .pt:
a directory with only .pt files is refused with one line naming the command; FiLM and diffusion
checkpoints are refused with one line; dimensions come from the tensors, statistics from
dataset_statistics.json (replacing config.json's norm_stats, as upstream), the chunk / images /
normalisation from the VLA_OFT_* choices, then oft_config.json, then upstream's platform table; the loaded
model holds the converted tensors. The command `vla-inference convert oft DIR` writes the files and says
so, ends every mistake with one line (exit 1; usage 2), and refuses a live code-running pickle without
running it or writing anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers.oft_checkpoints import DATASET, STEP, tiny_components, write_pt, write_tiny_oft_checkpoint
from vla_inference.cli import main
from vla_inference.models.base import ModelLoadError
from vla_inference.models.openvla import oft_checkpoint as oc

EXECUTED: list[str] = []


def _mark(tag: str) -> str:
    EXECUTED.append(tag)
    return tag


class Payload:
    """Unpickling this would call _mark: what an arbitrary-code pickle does."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_mark, ("ran",))


def _safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(file), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118


def test_conversion_strips_ddp_and_keeps_every_tensor(tmp_path: Path) -> None:
    path = write_tiny_oft_checkpoint(tmp_path / "ck")
    written = oc.convert_oft_checkpoint(path)
    assert [f.name for f in written] == [
        f"action_head--{STEP}_checkpoint.safetensors",
        f"proprio_projector--{STEP}_checkpoint.safetensors",
        oc.OFT_CONFIG_FILE,
    ]
    expected = tiny_components(seed=0)
    for name in ("action_head", "proprio_projector"):
        tensors, metadata = _safetensors(path / f"{name}--{STEP}_checkpoint.safetensors")
        assert set(tensors) == set(expected[name]) and not any(k.startswith("module.") for k in tensors)
        for key, value in expected[name].items():
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
        assert metadata["converted_from"] == f"{name}--{STEP}_checkpoint.pt"
        assert len(metadata["sha256"]) == 64
    config = json.loads((path / oc.OFT_CONFIG_FILE).read_text())
    assert config["num_actions_chunk"] == 8 and config["num_images_in_input"] == 2
    assert (config["action_dim"], config["proprio_dim"], config["normalization"]) == (7, 8, "bounds_q99")
    with pytest.raises(ModelLoadError, match=r"already holds action_head--150000_checkpoint\.safetensors"):
        oc.convert_oft_checkpoint(path)
    assert oc.convert_oft_checkpoint(path, overwrite=True)[0].name.endswith(".safetensors")


def test_conversion_accepts_files_without_the_ddp_prefix(tmp_path: Path) -> None:
    path = write_tiny_oft_checkpoint(tmp_path / "ck", ddp=False, convert=True)
    tensors, _ = _safetensors(path / f"action_head--{STEP}_checkpoint.safetensors")
    assert "model.fc2.weight" in tensors


def test_weights_only_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    path.mkdir()
    torch.save(
        {"module.model.fc2.weight": torch.zeros(7, 64), "evil": Payload()},
        path / "action_head--1_checkpoint.pt",
    )
    EXECUTED.clear()
    with pytest.raises(ModelLoadError, match=r"weights_only=True") as err:
        oc.convert_oft_checkpoint(path)
    assert EXECUTED == []  # the payload never ran
    assert "action_head--1_checkpoint.pt" in str(err.value) and "\n" not in str(err.value)
    assert not (path / "action_head--1_checkpoint.safetensors").exists()


@pytest.mark.parametrize(
    "state",
    [{"model.fc2.weight": {"nested": torch.zeros(2)}}, {"step": 3}, [torch.zeros(2)], {}],
    ids=["nested", "not-a-tensor", "a-list", "empty"],
)
def test_conversion_refuses_anything_but_a_flat_dict_of_tensors(tmp_path: Path, state: object) -> None:
    torch.save(state, tmp_path / "action_head--1_checkpoint.pt")
    with pytest.raises(ModelLoadError, match=r"flat dict of tensors|not a state dict"):
        oc.convert_oft_checkpoint(tmp_path)


def test_loader_refuses_pt_only_directories_naming_the_command(tmp_path: Path) -> None:
    path = write_tiny_oft_checkpoint(tmp_path / "ck")
    with pytest.raises(ModelLoadError) as err:
        oc.read_oft_checkpoint(path)
    message = str(err.value)
    assert f"vla-inference convert oft {path}" in message and "action_head--150000_checkpoint.pt" in message
    assert "\n" not in message
    oc.convert_oft_checkpoint(path)
    (path / f"proprio_projector--{STEP}_checkpoint.safetensors").unlink()  # the projector only as .pt
    with pytest.raises(
        ModelLoadError, match=r"proprio_projector--150000_checkpoint.pt is a PyTorch pickle.*convert oft"
    ):
        oc.read_oft_checkpoint(path)


def test_film_and_diffusion_checkpoints_are_refused_in_one_line(tmp_path: Path) -> None:
    path = write_tiny_oft_checkpoint(tmp_path / "film", convert=True)
    write_pt(
        path / f"vision_backbone--{STEP}_checkpoint.pt", {"featurizer.blocks.0.scale.weight": torch.zeros(2)}
    )
    for call in (oc.read_oft_checkpoint, oc.convert_oft_checkpoint):
        with pytest.raises(ModelLoadError, match="uses FiLM") as err:
            call(path)
        assert "\n" not in str(err.value)
    path = write_tiny_oft_checkpoint(tmp_path / "diffusion", convert=True)
    write_pt(path / f"noisy_action_projector--{STEP}_checkpoint.pt", {"fc1.weight": torch.zeros(2, 1)})
    with pytest.raises(ModelLoadError, match="diffusion action head"):
        oc.read_oft_checkpoint(path)


def test_two_head_files_are_refused(tmp_path: Path) -> None:
    path = write_tiny_oft_checkpoint(tmp_path / "ck", convert=True)
    (path / "action_head--9_checkpoint.safetensors").write_bytes(
        (path / f"action_head--{STEP}_checkpoint.safetensors").read_bytes()
    )
    with pytest.raises(ModelLoadError, match="2 action_head checkpoints"):
        oc.read_oft_checkpoint(path)


def test_read_takes_dims_from_tensors_and_stats_from_dataset_statistics(tmp_path: Path) -> None:
    path = write_tiny_oft_checkpoint(tmp_path / "ck", convert=True)
    assert oc.is_oft_checkpoint(path) and not oc.is_oft_checkpoint(tmp_path)
    info = oc.read_oft_checkpoint(path)
    cfg = info.config
    assert (cfg.chunk_size, cfg.action_dim, cfg.proprio_dim, cfg.num_images, cfg.head_blocks) == (
        8,
        7,
        8,
        2,
        2,
    )
    assert list(info.actions) == [DATASET] == list(info.proprio)  # config.json's bridge_orig is replaced
    stats = json.loads((path / "dataset_statistics.json").read_text())[DATASET]
    actions, proprio = info.actions[DATASET].stats, info.proprio[DATASET].stats
    assert actions.q01 is not None and actions.q01.tolist() == stats["action"]["q01"]
    assert actions.mask is not None and actions.mask.tolist() == [True] * 6 + [False]
    assert proprio.q99 is not None and proprio.q99.tolist() == stats["proprio"]["q99"]
    assert proprio.mask is None and proprio.min is None  # no mask: every dimension normalised
    assert info.actions[DATASET].eps == oc.RANGE_EPS == 1e-8
    assert info.head_file.suffix == ".safetensors" and all(
        f.suffix == ".safetensors" for f in info.weight_files
    )
    # without oft_config.json: upstream's platform table by (action 7, proprio 8) = LIBERO
    (path / oc.OFT_CONFIG_FILE).unlink()
    assert oc.read_oft_checkpoint(path).config.chunk_size == 8
    # min/max when the sidecar says bounds (ALOHA's normalisation)
    (path / oc.OFT_CONFIG_FILE).write_text(
        json.dumps({"num_actions_chunk": 4, "num_images_in_input": 1, "normalization": "bounds"})
    )
    info = oc.read_oft_checkpoint(path)
    assert (info.config.chunk_size, info.config.num_images) == (4, 1)
    low = info.actions[DATASET].stats.min
    assert low is not None and low.tolist() == stats["action"]["min"]
    # the VLA_OFT_* settings come first
    chosen = oc.read_oft_checkpoint(path, oc.OFTChoices(chunk_size=6, normalization="bounds_q99")).config
    assert (chosen.chunk_size, chosen.num_images) == (6, 1)


def test_unknown_dims_need_a_setting_or_the_sidecar(tmp_path: Path) -> None:
    path = write_tiny_oft_checkpoint(tmp_path / "ck", proprio=False)
    oc.convert_oft_checkpoint(path)  # action 7 without proprio: no platform to take a chunk size from
    config = json.loads((path / oc.OFT_CONFIG_FILE).read_text())
    assert (config["action_dim"], config["proprio_dim"], config["num_actions_chunk"]) == (7, 0, None)
    with pytest.raises(ModelLoadError, match=r"num_actions_chunk .*set VLA_OFT_CHUNK_SIZE or write it into"):
        oc.read_oft_checkpoint(path)
    chosen = oc.OFTChoices(chunk_size=5, num_images=1, normalization="bounds_q99")
    info = oc.read_oft_checkpoint(path, chosen)
    assert (info.config.chunk_size, info.config.proprio_dim, info.proprio) == (5, 0, {})
    config |= {"num_actions_chunk": 5, "num_images_in_input": 1, "normalization": "bounds_q99"}
    (path / oc.OFT_CONFIG_FILE).write_text(json.dumps(config))
    assert oc.read_oft_checkpoint(path).config.num_images == 1
    with pytest.raises(ModelLoadError, match="1 to 3 images"):
        oc.read_oft_checkpoint(path, oc.OFTChoices(num_images=4))


def test_loaded_model_holds_the_converted_tensors(tmp_path: Path) -> None:
    path = write_tiny_oft_checkpoint(tmp_path / "ck", convert=True)
    model = oc.load_oft_model(oc.read_oft_checkpoint(path), "cpu", torch.float32)
    expected = tiny_components(seed=0)
    for name, state in expected.items():
        for key, value in state.items():
            torch.testing.assert_close(model.state_dict()[f"{name}.{key}"], value, rtol=0, atol=0)
    assert not hasattr(model, "lm_head")
    bf16 = oc.load_oft_model(oc.read_oft_checkpoint(path), "cpu", torch.bfloat16)
    assert bf16.action_head.model.fc1.weight.dtype == torch.bfloat16


def test_a_head_of_the_wrong_width_is_refused(tmp_path: Path) -> None:
    path = write_tiny_oft_checkpoint(tmp_path / "ck")
    state = tiny_components(seed=0)["action_head"]
    state["model.fc2.weight"] = torch.zeros(7, 32)  # the tiny LLM is 64 wide
    write_pt(path / f"action_head--{STEP}_checkpoint.pt", state)
    oc.convert_oft_checkpoint(path)
    with pytest.raises(ModelLoadError, match="does not fit the language model's width 64"):
        oc.read_oft_checkpoint(path)


# ---- the command: vla-inference convert oft DIR --------------------------------------------------


def test_the_convert_command_writes_safetensors_and_names_what_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_tiny_oft_checkpoint(tmp_path / "ck")
    assert main(["convert", "oft", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"wrote {path / f'action_head--{STEP}_checkpoint.safetensors'}",
        f"wrote {path / f'proprio_projector--{STEP}_checkpoint.safetensors'}",
        f"wrote {path / oc.OFT_CONFIG_FILE}",
    ]
    assert oc.read_oft_checkpoint(path).config.chunk_size == 8  # what the server reads
    assert main(["convert", "oft", str(path)]) == 1  # kept unless --overwrite
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vla-inference convert: ") and "--overwrite" in err
    assert main(["convert", "oft", str(path), "--overwrite"]) == 0
    capsys.readouterr()

    bare = write_tiny_oft_checkpoint(tmp_path / "bare", proprio=False)
    assert main(["convert", "oft", str(bare)]) == 0  # no platform: says which settings serving needs
    err = capsys.readouterr().err
    assert "VLA_OFT_CHUNK_SIZE, VLA_OFT_NUM_IMAGES, VLA_OFT_NORMALIZATION" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["convert", "oft", "{tmp}/missing"], 1, "does not exist"),
        (["convert", "oft", "{tmp}"], 1, "no action_head--<step>_checkpoint.pt in"),
        (["convert"], 2, "required: format"),
        (["convert", "oft"], 2, "required: checkpoint_dir"),
        (["convert", "gr00t", "{tmp}"], 2, "invalid choice: 'gr00t'"),
    ],
)
def test_convert_mistakes_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, words: str
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if code == 2:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    else:
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    if code == 1:
        assert err.count("\n") == 1


def test_the_convert_command_refuses_a_pickle_that_runs_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ck"
    path.mkdir()
    file = path / "action_head--1_checkpoint.pt"
    torch.save({"module.model.fc2.weight": torch.zeros(7, 64), "evil": Payload()}, file)
    EXECUTED.clear()
    torch.load(file, weights_only=False)  # the payload is live: the full unpickler runs it
    assert EXECUTED == ["ran"]
    EXECUTED.clear()
    assert main(["convert", "oft", str(path)]) == 1
    err = capsys.readouterr().err
    assert EXECUTED == []  # the conversion never ran it
    assert "refused by torch.load(weights_only=True)" in err and err.count("\n") == 1
    assert sorted(p.name for p in path.iterdir()) == [file.name]  # nothing written
