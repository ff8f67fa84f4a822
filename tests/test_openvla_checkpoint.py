"""OpenVLA checkpoint loading and serving, on tiny checkpoints in the published layout.

Proves: the openvla-7b directory layout (config.json with norm_stats, sharded safetensors +
index or one model.safetensors, tokenizer.model, preprocessor_config.json) loads through
OpenVLAPolicy.load and predicts finite (1, 7) actions; the image and the instruction change
the action; a batch of different prompt lengths gives the same tokens as its samples one by
one; de-tokenisation and un-normalisation equal values computed here by hand from the bins and
the statistics the helper wrote; the unnorm key follows embodiment_tag / VLA_NORM_STATS_KEY and
an ambiguous checkpoint is refused with the dataset names; bad requests and bad checkpoints
fail naming the field / the file / the tensors.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.openvla_checkpoints import tiny_tokenizer_model, write_tiny_openvla_checkpoint
from vla_inference.config import Settings
from vla_inference.models.base import InvalidObservation, ModelLoadError, Observation
from vla_inference.models.openvla.policy import (
    SPACE_TOKEN,
    OpenVLAPolicy,
    decoded,
    detokenize,
    preprocess_image,
)
from vla_inference.models.registry import model_class


def _settings(**kw: object) -> Settings:
    return Settings(model_type="openvla", **kw)  # type: ignore[arg-type]


def _obs(image: np.ndarray, instruction: str = "Pick up the red cup", embodiment: str = "", joints: int = 0):
    return Observation(
        images={"base": image},
        joint_positions=np.zeros(joints, np.float32),
        instruction=instruction,
        embodiment=embodiment,
    )


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_openvla_checkpoint(tmp_path_factory.mktemp("openvla") / "tiny-openvla", seed=0)


@pytest.fixture(scope="module")
def multi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_openvla_checkpoint(
        tmp_path_factory.mktemp("openvla") / "multi", seed=0, datasets=("bridge_orig", "fractal20220817_data")
    )


@pytest.fixture(scope="module")
def policy(ckpt_dir: Path) -> OpenVLAPolicy:
    p = OpenVLAPolicy(_settings())
    p.load(str(ckpt_dir), "cpu")
    return p


def test_registry_names_the_policy() -> None:
    assert model_class("openvla") is OpenVLAPolicy


def test_loads_and_predicts_finite_actions(policy: OpenVLAPolicy) -> None:
    info = policy.model_info
    assert (info.family, info.action_dim, info.chunk_size, info.horizon) == ("openvla", 7, 1, 1)
    assert info.embodiments == ("bridge_orig",) and info.default_embodiment == "bridge_orig"
    assert info.camera_names == ("base",) and info.image_size == (28, 28)
    assert info.dtype == "float32" and dict(info.state_dims) == {}
    prediction = policy.predict(_obs(_images(1)[0]))
    assert prediction.actions.shape == (1, 7) and prediction.actions.dtype == np.float32
    assert np.all(np.isfinite(prediction.actions))
    assert 0.0 < prediction.confidence <= 1.0
    policy.predict(policy.warmup_observation())


def test_single_file_checkpoint_equals_sharded(policy: OpenVLAPolicy, tmp_path: Path) -> None:
    single = write_tiny_openvla_checkpoint(tmp_path / "single", seed=0, sharded=False)
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    other = OpenVLAPolicy(_settings())
    other.load(str(single), "cpu")
    obs = _obs(_images(1, seed=3)[0])
    np.testing.assert_array_equal(other.predict(obs).actions, policy.predict(obs).actions)


def test_image_and_instruction_matter(policy: OpenVLAPolicy) -> None:
    samples = [policy.prepare(_obs(img)) for img in _images(4, seed=1)]
    tokens = {tuple(raw.actions.ravel().tolist()) for raw in policy.forward(samples)}
    assert len(tokens) > 1, "different images gave the same action tokens"
    image = _images(1, seed=2)[0]
    a = policy.forward([policy.prepare(_obs(image, "pick up the spoon"))])[0].actions
    b = policy.forward([policy.prepare(_obs(image, "close the drawer on the left"))])[0].actions
    assert not np.array_equal(a, b)


def test_batch_equals_one_by_one(policy: OpenVLAPolicy) -> None:
    instructions = [
        "pick up the cup",
        "put the red block on the blue plate and then open the drawer",
        "move left",
    ]
    samples = [
        policy.prepare(_obs(img, text)) for img, text in zip(_images(3, seed=4), instructions, strict=True)
    ]
    assert len({s.inputs.input_ids.shape[0] for s in samples}) == 3  # really different prompt lengths
    assert len({s.batch_key for s in samples}) == 1
    batched = policy.forward(samples)
    for sample, raw in zip(samples, batched, strict=True):
        alone = policy.forward([sample])[0]
        np.testing.assert_array_equal(raw.actions, alone.actions)  # the same tokens, so the same bins
        assert raw.confidence == pytest.approx(alone.confidence, rel=1e-4)


def test_prompt_tokens(policy: OpenVLAPolicy) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=tiny_tokenizer_model())
    ids = policy.prepare(_obs(_images(1)[0], "  Pick UP the Cup ")).inputs.input_ids.tolist()
    expected = [1, *sp.encode("In: What action should the robot take to pick up the cup?\nOut:"), SPACE_TOKEN]
    assert ids == expected


def test_a_tokenizer_larger_than_the_embedding_is_refused(ckpt_dir: Path, tmp_path: Path) -> None:
    """A tokenizer with more pieces than the checkpoint's embedding has rows is the wrong one."""
    import sentencepiece

    big = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([f"w{i} t{i} x{i} y{i} z{i} q{i} r{i} s{i} u{i}" for i in range(4000)]),
        model_writer=big,
        vocab_size=33000,
        model_type="word",
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(big.getvalue())
    with pytest.raises(ModelLoadError, match="wrong tokenizer"):
        OpenVLAPolicy(_settings(tokenizer_path=str(tmp_path / "tokenizer.model"))).load(str(ckpt_dir), "cpu")


def test_detokenize_hand_values() -> None:
    # bin = clip(32000 - id - 1, 0, 254); centres of linspace(-1, 1, 256) = -1 + (2k + 1) / 255.
    tokens = np.array([31999, 31998, 31872, 31745, 31744, 100, 32000, 32063])
    expected = np.array([-1 + 1 / 255, -1 + 3 / 255, -1 + 255 / 255, 1 - 1 / 255, 1 - 1 / 255, 1 - 1 / 255])
    expected = np.concatenate([expected, [-1 + 1 / 255, -1 + 1 / 255]])  # padding ids clip to bin 0
    np.testing.assert_allclose(detokenize(tokens, 32000), expected, atol=1e-12)


def test_finish_unnormalises_with_the_dataset_statistics(policy: OpenVLAPolicy, ckpt_dir: Path) -> None:
    stats = json.loads((ckpt_dir / "config.json").read_text())["norm_stats"]["bridge_orig"]["action"]
    q01, q99, mask = np.array(stats["q01"]), np.array(stats["q99"]), np.array(stats["mask"])
    assert not mask[-1] and mask[:-1].all()
    tokens = np.array([31999, 31744, 31872, 31900, 31800, 31950, 31745])
    bins = np.clip(32000 - tokens - 1, 0, 254)
    normalized = -1 + (2 * bins + 1) / 255
    expected = np.where(mask, 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)
    probs = np.array([0.5, 0.25, 1.0, 0.5, 0.5, 1.0, 0.125], np.float32)
    sample = policy.prepare(_obs(_images(1)[0]))
    prediction = policy.finish(decoded(tokens, probs, policy.loaded.network.cfg), sample)
    np.testing.assert_allclose(prediction.actions[0], expected, rtol=1e-6, atol=1e-6)
    assert prediction.actions[0, -1] == pytest.approx(1 - 1 / 255)  # masked: passes through
    assert prediction.confidence == pytest.approx(float(np.prod(probs.astype(np.float64)) ** (1 / 7)))


def test_unnorm_key_selection(multi_dir: Path) -> None:
    p = OpenVLAPolicy(_settings())
    p.load(str(multi_dir), "cpu")
    assert p.model_info.embodiments == ("bridge_orig", "fractal20220817_data")
    assert p.model_info.default_embodiment == ""
    image = _images(1)[0]
    with pytest.raises(InvalidObservation) as err:
        p.prepare(_obs(image))
    assert err.value.field == "embodiment_tag"
    assert "bridge_orig" in err.value.message and "fractal20220817_data" in err.value.message
    with pytest.raises(InvalidObservation) as err:
        p.prepare(_obs(image, embodiment="unknown_robot"))
    assert err.value.field == "embodiment_tag"
    bridge = p.prepare(_obs(image, embodiment="bridge_orig"))
    fractal = p.prepare(_obs(image, embodiment="fractal20220817_data"))
    assert (bridge.inputs.unnorm_key, fractal.inputs.unnorm_key) == ("bridge_orig", "fractal20220817_data")
    raw_b, raw_f = p.forward([bridge, fractal])
    np.testing.assert_array_equal(raw_b.actions, raw_f.actions)  # same image and prompt: same tokens
    assert not np.allclose(p.finish(raw_b, bridge).actions, p.finish(raw_f, fractal).actions)
    p.predict(p.warmup_observation())  # warm-up works without a default

    pinned = OpenVLAPolicy(_settings(norm_stats_key="fractal20220817_data"))
    pinned.load(str(multi_dir), "cpu")
    assert pinned.model_info.default_embodiment == "fractal20220817_data"
    assert pinned.prepare(_obs(image)).inputs.unnorm_key == "fractal20220817_data"

    with pytest.raises(ModelLoadError, match="bridge_orig, fractal20220817_data"):
        OpenVLAPolicy(_settings(norm_stats_key="nope")).load(str(multi_dir), "cpu")


def test_dataset_statistics_json_adds_keys(tmp_path: Path) -> None:
    d = write_tiny_openvla_checkpoint(tmp_path / "ft", seed=1)
    stats = json.loads((d / "config.json").read_text())["norm_stats"]["bridge_orig"]
    (d / "dataset_statistics.json").write_text(json.dumps({"my_robot": stats}))
    p = OpenVLAPolicy(_settings(norm_stats_key="my_robot"))
    p.load(str(d), "cpu")
    assert p.model_info.embodiments == ("bridge_orig", "my_robot")


def test_bad_observations(policy: OpenVLAPolicy) -> None:
    image = _images(1)[0]
    cases = [
        (
            Observation(images={"wrist": image}, joint_positions=np.zeros(0, np.float32), instruction="x"),
            "cameras",
        ),
        (
            Observation(
                images={"base": image, "wrist": image},
                joint_positions=np.zeros(0, np.float32),
                instruction="x",
            ),
            "cameras",
        ),
        (Observation(images={}, joint_positions=np.zeros(0, np.float32), instruction="x"), "cameras"),
        (_obs(image[..., :2]), "cameras"),
        (_obs(image, instruction="   "), "language_instruction"),
        (_obs(image, instruction="a" * 2000), "language_instruction"),
        (
            _obs(image, instruction="ж" * 400),
            "language_instruction",
        ),  # 800 byte-fallback tokens > 512 positions
        (
            Observation(
                images={"base": image}, joint_positions=np.array([np.nan], np.float32), instruction="x"
            ),
            "joint_positions",
        ),
    ]
    for observation, field in cases:
        with pytest.raises(InvalidObservation) as err:
            policy.prepare(observation)
        assert err.value.field == field
    # Joint positions are not used by OpenVLA: any finite count is accepted.
    for joints in (0, 7, 14):
        policy.prepare(_obs(image, joints=joints))


def test_preprocess_constant_image(policy: OpenVLAPolicy) -> None:
    spec = policy.loaded.checkpoint.image
    pixels = preprocess_image(np.full((50, 70, 3), 51, np.uint8), spec)  # 51 / 255 = 0.2
    assert pixels.shape == (6, 28, 28)
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406, 0.5, 0.5, 0.5]),
        torch.tensor([0.229, 0.224, 0.225, 0.5, 0.5, 0.5]),
    )
    torch.testing.assert_close(pixels.mean((1, 2)), (0.2 - mean) / std, rtol=1e-5, atol=1e-5)


def test_bad_checkpoints(ckpt_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="VLA_MODEL_PATH"):
        OpenVLAPolicy(_settings()).load("", "cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        OpenVLAPolicy(_settings()).load(str(tmp_path / "nothing"), "cpu")

    no_tok = tmp_path / "no_tok"
    shutil.copytree(ckpt_dir, no_tok)
    (no_tok / "tokenizer.model").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.model"):
        OpenVLAPolicy(_settings()).load(str(no_tok), "cpu")

    broken = tmp_path / "broken"
    shutil.copytree(ckpt_dir, broken)
    shard = broken / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    dropped = "language_model.lm_head.weight"
    assert dropped in tensors
    del tensors[dropped]
    tensors["language_model.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(shard))
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    index["weight_map"]["language_model.extra.weight"] = shard.name
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError) as err:
        OpenVLAPolicy(_settings()).load(str(broken), "cpu")
    assert dropped in str(err.value) and "language_model.extra.weight" in str(err.value)

    no_shard = tmp_path / "no_shard"
    shutil.copytree(ckpt_dir, no_shard)
    (no_shard / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model-00001-of-00002\.safetensors"):
        OpenVLAPolicy(_settings()).load(str(no_shard), "cpu")


def test_bfloat16_weights(ckpt_dir: Path) -> None:
    p = OpenVLAPolicy(_settings(dtype="bfloat16"))
    p.load(str(ckpt_dir), "cpu")
    assert p.model_info.dtype == "bfloat16"
    model = p.loaded.network
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    samples = [
        p.prepare(_obs(img, text)) for img, text in zip(_images(2), ["pick up the cup", "move"], strict=True)
    ]
    for raw, sample in zip(p.forward(samples), samples, strict=True):
        prediction = p.finish(raw, sample)
        assert prediction.actions.shape == (1, 7) and np.all(np.isfinite(prediction.actions))


def test_preprocess_letterbox_and_resize_crop(policy: OpenVLAPolicy) -> None:
    from dataclasses import replace

    spec = policy.loaded.checkpoint.image
    white = np.full((20, 40, 3), 255, np.uint8)  # wide image
    boxed = preprocess_image(white, replace(spec, resize_strategy="letterbox"))
    # Padded to 40x40 with the SigLIP mean (127) above and below, then resized to 28x28.
    assert boxed[3:, 0].mean().item() == pytest.approx((127 / 255 - 0.5) / 0.5, abs=1e-5)
    assert boxed[3:, 14].mean().item() == pytest.approx(1.0, abs=1e-5)
    half = white.copy()
    half[:, :20] = 0  # left half black
    cropped = preprocess_image(half, replace(spec, resize_strategy="resize-crop"))
    # Short side -> 28 (28x56), centre crop 28: columns 14..42, black on the left, white on the right.
    assert cropped.shape == (6, 28, 28)
    assert cropped[3:, :, 0].mean().item() == pytest.approx(-1.0, abs=1e-5)
    assert cropped[3:, :, -1].mean().item() == pytest.approx(1.0, abs=1e-5)
