"""Public ColQwen3-family checkpoint formats (colqwen3_lib/formats.py): each is written in its published
layout (config.json fields and weight names) from the tiny checkpoint, loaded without remote code, and
must load every tensor and embed exactly as the same weights loaded in the kit's own format. Also: the
formats' prompts reach the processor `load_model` returns, colpali-engine-style adapters load, and an
unknown or refused layout is reported with what was found."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from colqwen3_lib import ColQwen3, formats, load_model
from colqwen3_lib.formats import FORMATS, Checkpoint, detect, detect_format, prompts_for

ATOL = 1e-6
QUERIES = ["red pie chart", "Which page shows a blue table in landscape layout?"]
# A Qwen3-VL-Instruct / ColQwen3 config's own fields, which Tomoro's and Ops' configs repeat at the top level.
BACKBONE_FIELDS = (
    "text_config",
    "vision_config",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)


@pytest.fixture(scope="module")
def pages():
    return [Image.new("RGB", (320, 480), (200, 30, 30)), Image.new("RGB", (600, 300), (30, 30, 200))]


@pytest.fixture(scope="module")
def native(tiny_path, tmp_path_factory):
    """`native(dim)`: a kit-format ColQwen3 folder with a `dim`-output head (seeded, not zero)."""
    made = {}

    def make(dim):
        if dim not in made:
            torch.manual_seed(dim)
            model = ColQwen3.from_pretrained(tiny_path, dim=dim, dtype=torch.float32)
            made[dim] = tmp_path_factory.mktemp(f"native-{dim}")
            model.save_pretrained(made[dim])
            for f in tiny_path.iterdir():  # the tokenizer and processor files
                if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
                    shutil.copy(f, made[dim] / f.name)
        return made[dim]

    return make


def canonical(key):
    """A kit weight name without its `model.` prefix: `visual.*`, `language_model.*` or `custom_text_proj.*`."""
    return key.removeprefix("model.")


def write_layout(src, dst, rename, config, extra=None):
    """Copy `src` (kit format) to `dst` with every weight renamed by `rename` and the given config.json."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)
    weights = {rename(canonical(k)): v for k, v in load_file(src / "model.safetensors").items()}
    save_file({**weights, **(extra or {})}, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def kit_config(src):
    return json.loads((src / "config.json").read_text())


def backbone_fields(src):
    config = kit_config(src)
    return {k: config[k] for k in BACKBONE_FIELDS}


def embed(model, processor, pages):
    with torch.no_grad():
        return model(**processor.process_images(pages)), model(**processor.process_queries(QUERIES))


def assert_same_model(loaded, reference, processor, pages, extra=()):
    """Every tensor loaded, none left over except `extra`, same weights and same embeddings (float32)."""
    info = loaded.loading_info
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert sorted(info["unexpected_keys"]) == sorted(extra)
    ours, theirs = loaded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    for a, b in zip(embed(loaded, processor, pages), embed(reference, processor, pages)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def load(path, **kwargs):
    return ColQwen3.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


# -------------------------------------------------------------------------------- each format loads


@pytest.mark.parametrize(
    ("prefix", "head_prefix"),
    [("model.", ""), ("", ""), ("model.", "base_model.model.")],
    ids=["transformers5-save", "transformers4-save", "head-named-as-in-peft"],
)
def test_colpali_engine_checkpoint(native, processor, pages, tmp_path, prefix, head_prefix):
    # colpali-engine 0.3.18 ColQwen3: model_type qwen3_vl, architectures ColQwen3, no head-size field
    # (320 is hard-coded), the backbone under `model.` (transformers 5) or bare (4.x), head custom_text_proj
    # (its key mapping also accepts the head as `base_model.model.custom_text_proj`).
    src = native(320)
    config = {k: v for k, v in kit_config(src).items() if k != "embedding_dim"}
    dst = write_layout(
        src,
        tmp_path / "colpali",
        lambda k: head_prefix + k if k.startswith("custom_text_proj") else prefix + k,
        config,
    )
    assert detect_format(dst).name == "colpali-engine"
    loaded = load(dst)
    assert loaded.dim == 320
    assert_same_model(loaded, load(src), processor, pages)


@pytest.mark.parametrize("lm_head", [False, True], ids=["4b-tied", "8b-untied-lm_head"])
def test_tomoro_checkpoint(native, processor, pages, tmp_path, lm_head):
    # tomoro-colqwen3-embed: ColQwen3Config (model_type colqwen3, embed_dim 320, Qwen3-VL's sub-configs at
    # the top level); the model wraps Qwen3VLForConditionalGeneration as `vlm` (+ its lm_head when untied)
    # and names the head embedding_proj_layer (with a bias).
    src = native(320)
    config = {
        "architectures": ["ColQwen3"],
        "auto_map": {
            "AutoConfig": "configuration_colqwen3.ColQwen3Config",
            "AutoModel": "modeling_colqwen3.ColQwen3",
        },
        "model_type": "colqwen3",
        "embed_dim": 320,
        "padding_side": "left",
        "initializer_range": 0.02,
        "dtype": "bfloat16",
        **backbone_fields(src),
    }

    def rename(key):
        if key.startswith("custom_text_proj"):
            return key.replace("custom_text_proj", "embedding_proj_layer")
        return "vlm.model." + key

    weights = load_file(src / "model.safetensors")
    extra = (
        {"vlm.lm_head.weight": weights["model.language_model.embed_tokens.weight"].clone()} if lm_head else {}
    )
    dst = write_layout(src, tmp_path / "tomoro", rename, config, extra)
    assert detect_format(dst).name == "tomoro"
    loaded = load(dst)
    assert loaded.dim == 320
    assert_same_model(loaded, load(src), processor, pages, extra=["lm_head.weight"] if lm_head else [])


def ops_checkpoint(native, tmp_path, dims):
    # Ops-Colqwen3: model_type ops_colqwen3, `dims` (Matryoshka: the first `dims` outputs are kept, then
    # normalised); a Qwen3VLModel subclass saved by transformers 4.57, so bare `visual.*`/`language_model.*`
    # and a hidden x hidden custom_text_proj with a bias.
    src = native(64)  # the tiny backbone's hidden size
    config = {
        "architectures": ["OpsColQwen3Model"],
        "auto_map": {"AutoConfig": "configuration_ops_colqwen3.OpsColQwen3Config"},
        "model_type": "ops_colqwen3",
        "dims": dims,
        "mask_non_image_embeddings": False,
        **backbone_fields(src),
    }
    return src, write_layout(src, tmp_path / f"ops-{dims}", lambda k: k, config)


def test_ops_checkpoint_with_its_full_head(native, processor, pages, tmp_path):
    src, dst = ops_checkpoint(native, tmp_path, dims=64)
    assert detect_format(dst).name == "ops"
    loaded = load(dst)
    assert loaded.dim == 64
    assert_same_model(loaded, load(src), processor, pages)


@pytest.mark.parametrize(("dims", "dim", "kept"), [(16, None, 16), (64, 8, 8)])
def test_ops_matryoshka_keeps_the_first_outputs(native, processor, pages, tmp_path, dims, dim, kept):
    src, dst = ops_checkpoint(native, tmp_path, dims=dims)
    loaded = load(dst, dim=dim)
    assert loaded.dim == kept and loaded.config.embedding_dim == kept
    full = load(src)
    for ours, theirs in zip(embed(loaded, processor, pages), embed(full, processor, pages)):
        # Ops slices the projection, then normalises: with the full head's embeddings that is
        # slice, renormalise, and keep padding at zero.
        expected = torch.nn.functional.normalize(theirs[..., :kept], dim=-1) * (
            theirs.norm(dim=-1, keepdim=True) > 0
        )
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_ops_matryoshka_beyond_the_head_is_refused(native, tmp_path):
    _, dst = ops_checkpoint(native, tmp_path, dims=64)
    with pytest.raises(ValueError, match="cannot keep 65 of the head's 64 outputs"):
        load(dst, dim=65)


@pytest.mark.parametrize(
    ("model_type", "dim_field"),
    [("qwen3_vl", True), ("qwen3_vl", False), ("colqwen3", False)],
    ids=["config-dim", "head-shape", "colqwen3-model-type"],
)
def test_sauerkraut_checkpoint(native, processor, pages, tmp_path, model_type, dim_field):
    # SauerkrautLM-ColQwen3: colpali-engine's fork; a Qwen3VLModel subclass saved by transformers 4.57
    # (bare keys), a 128-d custom_text_proj, `dim` in the config when not 128. Its loader reads any
    # model_type as qwen3_vl (and calls it colqwen3 when absent), so both are accepted.
    src = native(128)
    config = {k: v for k, v in kit_config(src).items() if k != "embedding_dim"}
    config["model_type"] = model_type
    if dim_field:
        config["dim"] = 128
    dst = write_layout(src, tmp_path / "sauerkraut", lambda k: k, config)
    assert detect_format(dst).name == "sauerkraut"
    loaded = load(dst)
    assert loaded.dim == 128
    assert_same_model(loaded, load(src), processor, pages)


def test_kit_and_instruct_formats_keep_their_behaviour(native, tiny_path):
    assert detect_format(native(128)).name == "kit"
    assert detect_format("tiny").name == "qwen3-vl-instruct"
    instruct = load(tiny_path)
    assert sorted(instruct.loading_info["missing_keys"]) == [
        "custom_text_proj.bias",
        "custom_text_proj.weight",
    ]
    assert instruct.checkpoint_format.name == "qwen3-vl-instruct"


def test_an_instruct_checkpoint_with_its_lm_head_loads(tiny_path, tmp_path):
    # Qwen3-VL-8B-Instruct does not tie its output embeddings: lm_head.weight is there, unused by ColQwen3.
    dst = tmp_path / "instruct-8b-like"
    shutil.copytree(tiny_path, dst)
    weights = load_file(tiny_path / "model.safetensors")
    weights["lm_head.weight"] = weights["model.language_model.embed_tokens.weight"].clone()
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    assert sorted(load(dst).loading_info["unexpected_keys"]) == ["lm_head.weight"]


# ------------------------------------------------------------------------------ refused and unknown


def test_nemotron_colembed_is_refused_with_the_reason(native, tmp_path):
    src = native(128)
    config = {
        "architectures": ["Qwen3VLNemotronEmbedModel"],
        "model_type": "qwen3_vl_nemotron_embed",
        "pooling": "colbert",
        **backbone_fields(src),
    }
    dst = write_layout(src, tmp_path / "nemotron", lambda k: "model." + k, config)
    with pytest.raises(ValueError, match="bidirectional attention"):
        load(dst)


def test_an_unknown_layout_is_refused_naming_what_was_found(native, tmp_path):
    src = native(128)
    config = {**kit_config(src), "model_type": "colqwen2", "architectures": ["ColQwen2ForRetrieval"]}
    dst = write_layout(src, tmp_path / "unknown", lambda k: "vlm.model." + k, config)
    with pytest.raises(ValueError) as err:
        load(dst)
    message = str(err.value)
    assert "no known ColQwen3 layout" in message and "model_type='colqwen2'" in message
    assert "ColQwen2ForRetrieval" in message and "vlm.model" in message
    for name in ("tomoro", "ops", "colpali-engine", "sauerkraut", "kit", "qwen3-vl-instruct"):
        assert f"{name}:" in message


def test_a_tensor_the_format_does_not_explain_is_refused(native, tmp_path):
    # A qwen3_vl checkpoint whose head has another name would otherwise load with a fresh head.
    src = native(128)
    config = {k: v for k, v in kit_config(src).items() if k != "embedding_dim"}
    dst = write_layout(
        src, tmp_path / "linear-head", lambda k: k.replace("custom_text_proj", "linear"), config
    )
    with pytest.raises(RuntimeError, match="no place for.*linear"):
        load(dst)


def test_a_format_with_a_head_must_have_it(native, tmp_path):
    src = native(64)
    config = {"model_type": "ops_colqwen3", "dims": 64, **backbone_fields(src)}
    dst = write_layout(src, tmp_path / "ops-headless", lambda k: k, config)
    weights = load_file(dst / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "custom_text_proj" not in k}, dst / "model.safetensors")
    with pytest.raises(RuntimeError, match="lacks its projection head"):
        load(dst)


def test_a_folder_without_a_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no config.json"):
        detect_format(tmp_path)


def test_formats_are_recognised_from_the_config_alone_for_hub_ids():
    # A hub id's weights are not read before loading: the config decides (Instruct family by default).
    def fmt(config):
        return detect(Checkpoint("hub/id", config, None)).name

    assert fmt({"model_type": "colqwen3", "embed_dim": 320}) == "tomoro"
    assert fmt({"model_type": "ops_colqwen3"}) == "ops"
    assert fmt({"model_type": "qwen3_vl", "embedding_dim": 128}) == "kit"
    assert fmt({"model_type": "qwen3_vl"}) == "qwen3-vl-instruct"
    with pytest.raises(ValueError, match="does not load"):
        fmt({"model_type": "qwen3_vl_nemotron_embed"})


def test_the_table_documents_every_format():
    names = [f.name for f in FORMATS]
    assert len(names) == len(set(names))
    for f in FORMATS:
        assert f.title and f.prompts.query_augmentation_token == "<|endoftext|>"
        assert "<|image_pad|>" in f.prompts.visual_prompt_prefix


# --------------------------------------------------------------------------------------- prompts


def test_load_model_gives_the_processor_its_format_prompts(native, tmp_path):
    src = native(320)
    tomoro = write_layout(
        src,
        tmp_path / "tomoro",
        lambda k: (
            k.replace("custom_text_proj", "embedding_proj_layer")
            if k.startswith("custom_text_proj")
            else "vlm.model." + k
        ),
        {"model_type": "colqwen3", "embed_dim": 320, **backbone_fields(src)},
    )
    _, processor = load_model(str(tomoro), device="cpu", dtype=torch.float32)
    assert processor.query_prefix == "" and processor.query_augmentation_token == "<|endoftext|>"
    ids = processor.process_queries(["red chart"])["input_ids"][0].tolist()
    plain = processor.tokenizer("red chart")["input_ids"]
    assert ids[: len(plain)] == plain  # no `Query: ` in front

    _, ops = ops_checkpoint(native, tmp_path, dims=64)
    _, processor = load_model(str(ops), device="cpu", dtype=torch.float32)
    assert processor.query_prefix == "Query: "
    assert processor.visual_prompt_prefix.endswith("<|im_end|>\n<|im_start|>assistant\n<|endoftext|>")

    _, processor = load_model("tiny", device="cpu", dtype=torch.float32)
    assert processor.query_prefix == "" and prompts_for("tiny") == formats.KIT_PROMPTS  # the reference's


def test_a_processor_saved_by_the_kit_keeps_its_own_prompts_over_the_formats(native, tmp_path):
    model, processor = load_model("tiny", device="cpu", dtype=torch.float32)
    processor.query_prefix = "Ask: "
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    _, reloaded = load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    assert reloaded.query_prefix == "Ask: "


# -------------------------------------------------------------------------------------- adapters


def perturb_lora_b(model):
    """LoRA starts as the identity (B = 0); give B values so that the adapter changes the embeddings."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)


def test_a_colpali_engine_adapter_loads_with_colpali_prompts(native, processor, pages, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    src = native(320)
    base_dir = write_layout(
        src,
        tmp_path / "colpali-base",
        lambda k: k if k.startswith("custom_text_proj") else "model." + k,
        {k: v for k, v in kit_config(src).items() if k != "embedding_dim"},
    )
    torch.manual_seed(0)
    # colpali-engine's scripts/configs/qwen3/train_colqwen3_model.py LoRA: the head is a LoRA target too.
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        lora_dropout=0.1,
        init_lora_weights="gaussian",
        bias="none",
        task_type="FEATURE_EXTRACTION",
        target_modules="(.*(model)(?!.*visual).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(custom_text_proj).*$)",
    )
    peft_model = get_peft_model(load(base_dir), config)
    perturb_lora_b(peft_model)
    adapter = tmp_path / "colpali-adapter"
    peft_model.save_pretrained(adapter)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.custom_text_proj.lora_A.weight" in keys
    assert any(k.startswith("base_model.model.language_model.layers.0.") for k in keys)
    assert detect_format(adapter).name == "colpali-engine-adapter"

    model, adapted_processor = load_model(
        str(base_dir), adapter=str(adapter), device="cpu", dtype=torch.float32
    )
    assert adapted_processor.query_prefix == ""
    reference = PeftModel.from_pretrained(load(base_dir), str(adapter)).merge_and_unload().eval()
    base = load(base_dir)
    for ours, theirs, before in zip(
        embed(model, processor, pages), embed(reference, processor, pages), embed(base, processor, pages)
    ):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        assert not torch.allclose(ours, before, atol=1e-3)  # the adapter really changed something


def test_adapters_of_both_recipes_get_the_reference_prompts(tiny_path, tmp_path):
    """The kit's default LoRA is the reference's (the head is a LoRA target): the same layout as
    colpali-engine's adapters, with the same prompts; the kit's opt-in head-in-full layout too."""
    from peft import get_peft_model

    from colqwen3_lib.lora import lora_config

    for head_in_full, name in ((False, "colpali-engine-adapter"), (True, "kit-adapter")):
        folder = tmp_path / name
        get_peft_model(load(tiny_path), lora_config(rank=2, head_in_full=head_in_full)).save_pretrained(
            folder
        )
        assert detect_format(folder).name == name
        assert prompts_for(folder) == formats.KIT_PROMPTS == formats.COLPALI_PROMPTS
    with pytest.raises(ValueError, match="PEFT adapter"):
        load(tmp_path / "kit-adapter")


# ------------------------------------------------------------------------- checkpoints that lie or are damaged


def _copy(native, tmp_path, dim=128):
    folder = tmp_path / "copy"
    shutil.copytree(native(dim), folder)
    return folder


def test_a_config_json_that_is_not_json_is_one_line(native, tmp_path):
    folder = _copy(native, tmp_path)
    (folder / "config.json").write_text('{"model_type": "qwen3_vl",')
    with pytest.raises(formats.CheckpointError, match=r"config.json is not valid JSON \(.* at line 1"):
        ColQwen3.from_pretrained(str(folder))


def test_a_weights_file_cut_off_is_named(native, tmp_path):
    folder = _copy(native, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(
        formats.CheckpointError, match=r"model.safetensors is cut off .*download or copy it again"
    ):
        ColQwen3.from_pretrained(str(folder))


def test_weights_and_a_config_of_another_size_are_refused_before_loading(native, tmp_path):
    folder = _copy(native, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96  # the weights' MLPs are 128 wide
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        formats.CheckpointError, match=r"weights do not fit its config.json: \d+ tensors of other shapes"
    ):
        ColQwen3.from_pretrained(str(folder))
    config["text_config"]["intermediate_size"] = 128
    config["text_config"]["num_hidden_layers"] = 3  # the weights have 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(formats.CheckpointError, match="is missing .* backbone weights"):
        ColQwen3.from_pretrained(str(folder))


def test_a_head_of_another_size_than_its_config_or_dim_names_the_dim_that_loads_it(native, tmp_path):
    folder = _copy(native, tmp_path, dim=320)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "embedding_dim": 128}))
    with pytest.raises(
        formats.CheckpointError, match="head has 320 outputs, not the 128 asked for.*pass dim=320"
    ):
        ColQwen3.from_pretrained(str(folder))
    with pytest.raises(formats.CheckpointError, match="pass dim=320"):
        ColQwen3.from_pretrained(native(320), dim=128)
    assert ColQwen3.from_pretrained(str(folder), dim=320).dim == 320


def test_the_evaluation_command_says_what_is_wrong_with_a_checkpoint_in_one_line(native, tmp_path, capsys):
    from colqwen3_lib.evaluate import main

    folder = _copy(native, tmp_path)
    (folder / "config.json").write_text("not json")
    assert main(["--model-path", str(folder), "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "is not valid JSON" in error and "Traceback" not in error


@pytest.mark.parametrize("dim", [128, 64], ids=["128-d-head", "hidden-size-head"])
def test_a_kit_checkpoint_labelled_as_ops_is_refused_naming_its_real_layout(native, tmp_path, dim):
    # Loaded as Ops it would embed queries with Ops' "Query: " prefix. The tiny hidden size is 64, so the
    # 64-d case is told apart by the kit's embedding_dim alone.
    folder = _copy(native, tmp_path, dim=dim)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "ops_colqwen3"}))
    with pytest.raises(
        formats.CheckpointError, match="weights are not Ops'.*set model_type back to 'qwen3_vl'"
    ):
        detect_format(folder)
    with pytest.raises(formats.CheckpointError, match="this kit's ColQwen3.save_pretrained"):
        load_model(str(folder), device="cpu")
    _, real_ops = ops_checkpoint(native, tmp_path, dims=64)
    assert detect_format(real_ops).name == "ops"
