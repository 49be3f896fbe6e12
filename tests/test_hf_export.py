"""moe.interop whole models and moe-export: GPT -> transformers Mixtral / Qwen2-MoE -> GPT, and trainer.init_from."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[hf])")
pytest.importorskip("hydra", reason="moe-train needs hydra-core (pip install -e .[train])")

from tiny_runs import tiny_config, tokenised_corpus, train_run  # noqa: E402 (after the importorskip calls)
from transformers import (  # noqa: E402 (after the importorskip calls)
    AutoModelForCausalLM,
    AutoTokenizer,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from moe import interop  # noqa: E402 (after the importorskip calls)
from moe.export_cli import main as export_main  # noqa: E402 (after the importorskip calls)
from moe.generate import generate  # noqa: E402 (after the importorskip calls)
from moe.generate_cli import main as generate_main  # noqa: E402 (after the importorskip calls)
from moe.layer import moe_layers  # noqa: E402 (after the importorskip calls)
from moe.model import GPT, ModelConfig  # noqa: E402 (after the importorskip calls)
from moe.train import train  # noqa: E402 (after the importorskip calls)
from moe.train.checkpoint import CheckpointMismatchError  # noqa: E402 (after the importorskip calls)
from moe.train.loading import load_run  # noqa: E402 (after the importorskip calls)

SHAPE = {"vocab_size": 40, "seq_len": 32, "num_layers": 3, "hidden_size": 32, "num_heads": 4, "ffn_hidden_size": 16}


def random_gpt(**overrides) -> GPT:
    """A GPT with every weight random (norms included), so that no mapping mistake can hide behind a 1 or a 0."""
    model = GPT(ModelConfig(**{**SHAPE, "num_experts": 4, "top_k": 2, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


CASES = {
    "mixtral": ({}, "MixtralForCausalLM"),
    "mixtral_top1_untied": (
        {"top_k": 1, "router_kwargs": {"normalize_weights": True}, "tie_embeddings": False},
        "MixtralForCausalLM",
    ),
    "qwen_shared": ({"shared_experts": 2, "rope_base": 500.0}, "Qwen2MoeForCausalLM"),
    "qwen_dense_between": ({"moe_every": 2}, "Qwen2MoeForCausalLM"),
    "qwen_top1_unnormalised": ({"top_k": 1}, "Qwen2MoeForCausalLM"),
    "qwen_dense_only": ({"moe_every": 0}, "Qwen2MoeForCausalLM"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_exported_folder_loads_in_transformers_with_our_logits_and_greedy_tokens(case, tmp_path):
    overrides, architecture = CASES[case]
    model = random_gpt(**overrides)
    interop.to_hf_model(model).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == architecture
    ids = torch.randint(0, 40, (2, 32))
    torch.testing.assert_close(hf(ids).logits, model(ids)[0], rtol=0, atol=1e-4)
    prompt = ids[:1, :6]
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False)[0, 6:].tolist()
    assert theirs == generate(model, prompt[0].tolist(), 20, temperature=0)
    back, cfg = interop.from_hf_model(tmp_path)
    assert cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def randomised(hf):
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.zero_() if name.endswith("shared_expert_gate.weight") else p.normal_(0, 0.3)
    return hf.eval()


COMMON = {
    "vocab_size": 40,
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32,
    "num_experts_per_tok": 2,
}


def hf_models():
    torch.manual_seed(0)
    return {
        "mixtral": randomised(MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=4, **COMMON))),
        "qwen": randomised(
            Qwen2MoeForCausalLM(
                Qwen2MoeConfig(
                    intermediate_size=24,
                    moe_intermediate_size=24,
                    shared_expert_intermediate_size=48,
                    num_experts=4,
                    decoder_sparse_step=2,
                    norm_topk_prob=True,
                    qkv_bias=False,
                    tie_word_embeddings=True,
                    **COMMON,
                )
            )
        ),
    }


@pytest.mark.parametrize("name", ["mixtral", "qwen"])
@torch.no_grad()
def test_hugging_face_to_moe_and_back_is_exact(name):
    hf = hf_models()[name]
    model, cfg = interop.from_hf_model(hf)
    assert cfg.moe_every == (1 if name == "mixtral" else 2) and cfg.shared_experts == (0 if name == "mixtral" else 2)
    ids = torch.randint(0, 40, (2, 32))
    torch.testing.assert_close(model(ids)[0], hf(ids).logits, rtol=0, atol=1e-4)
    again = interop.to_hf_model(model).state_dict()
    original = hf.state_dict()
    assert list(again) == list(original)
    for key, value in original.items():
        assert torch.equal(again[key], value), key


ROUTER_REFUSALS = [
    ("expert_choice", {}, "ExpertChoiceRouter routing"),
    ("relu", {}, "ReLURouter routing"),
    ("base", {}, "BASERouter routing"),
    ("hash", {}, "HashRouter routing"),
    ("sinkhorn", {}, "SinkhornRouter routing"),
    ("topk", {"score_function": "sigmoid"}, "score_function='sigmoid'"),
    ("topk", {"bias_update_rate": 1e-3}, "an expert bias"),
    ("topk", {"capacity_factor": 1.25}, "capacity_factor=1.25"),
    ("topk", {"num_groups": 2, "groups_kept": 1}, "group-limited routing"),
    ("topk", {"route_scale": 2.0}, "route_scale=2.0"),
]


@pytest.mark.parametrize("router,kwargs,problem", ROUTER_REFUSALS)
def test_routing_transformers_cannot_express_is_refused_in_one_line(router, kwargs, problem):
    model = random_gpt(router=router, router_kwargs=kwargs)
    with pytest.raises(ValueError) as info:
        interop.to_hf_model(model)
    message = str(info.value)
    assert "\n" not in message and problem in message and "exportable: router=topk with softmax scores" in message


def test_forcing_mixtral_on_what_it_cannot_hold_names_the_reason():
    with pytest.raises(ValueError, match="normalize_weights=False .Mixtral always renormalises"):
        interop.to_hf_model(random_gpt(top_k=1), "mixtral")
    with pytest.raises(ValueError, match="shared_experts=1"):
        interop.to_hf_model(random_gpt(shared_experts=1), "mixtral")
    valid = r"\['auto', 'mixtral', 'qwen2_moe'\]"
    with pytest.raises(ValueError, match=f"architecture='llama' is not valid; valid: {valid}"):
        interop.to_hf_model(random_gpt(), "llama")


@torch.no_grad()
def test_hugging_face_settings_moe_cannot_express_are_refused_by_name():
    gqa = MixtralForCausalLM(MixtralConfig(intermediate_size=24, **{**COMMON, "num_key_value_heads": 2}))
    with pytest.raises(ValueError, match=r"grouped-query attention \(num_key_value_heads=2 < 4 heads\)"):
        interop.from_hf_model(gqa)
    eps = MixtralForCausalLM(MixtralConfig(intermediate_size=24, **{**COMMON, "rms_norm_eps": 1e-5}))
    with pytest.raises(ValueError, match="rms_norm_eps=1e-05"):
        interop.from_hf_model(eps)
    qwen = hf_models()["qwen"]
    qwen.model.layers[1].mlp.shared_expert_gate.weight.fill_(0.1)
    qwen.model.layers[0].self_attn.q_proj.bias = torch.nn.Parameter(torch.ones(32))
    with pytest.raises(ValueError, match="non-zero q_proj bias .layer 0.*learned shared_expert_gate .layer 1"):
        interop.from_hf_model(qwen)


@pytest.fixture(scope="module")
def tokenised_run(tmp_path_factory):
    """A tiny run on BPE tokens (data.source=bin with a tokenizer.json beside the .bin), and its export."""
    root = tmp_path_factory.mktemp("tokenised")
    tokens, vocab = tokenised_corpus(root)
    run_dir = train_run(root, data={"source": "bin", "path": str(tokens), "vocab_size": vocab}, seq_len=32)
    export_main([f"source={run_dir}", f"output={root / 'hf'}"])
    return run_dir, root / "hf"


def test_moe_export_writes_a_folder_transformers_generates_from_like_moe_generate(tokenised_run, capsys):
    run_dir, folder = tokenised_run
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert json.loads((folder / "generation_config.json").read_text())["max_length"] == 32
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = "def encode"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
    capsys.readouterr()
    generate_main([f"source={run_dir}", f"prompt={prompt}", "max_new_tokens=12", "temperature=0", "device=cpu"])
    assert capsys.readouterr().out == prompt + tokenizer.decode(theirs) + "\n"


def test_moe_export_refuses_a_used_folder_and_an_inexpressible_router(tokenised_run, tmp_path):
    run_dir, folder = tokenised_run
    with pytest.raises(SystemExit, match="exists and is not an empty folder"):
        export_main([f"source={run_dir}", f"output={folder}"])
    relu_run = train_run(tmp_path, router="relu")
    with pytest.raises(
        SystemExit,
        match="^moe-export: neither Mixtral nor Qwen2-MoE can express router=relu {}: ReLURouter routing; exportable",
    ):
        export_main([f"source={relu_run}", f"output={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_training_starts_from_an_exported_folder_and_refuses_another_shape(tokenised_run, tmp_path):
    run_dir, folder = tokenised_run
    exported = load_run(run_dir)
    data = {"source": "bin", "path": exported.cfg.data.path, "vocab_size": exported.vocab_size}
    start = {"init_from": str(folder), "max_steps": 1, "export_safetensors": False}
    cfg = tiny_config(tmp_path, data=data, trainer={**start, "ckpt_interval": 1}, seq_len=32)
    cfg.optim.lr = 1e-12  # one step that moves nothing measurable: the checkpoint holds the folder's weights
    summary = train(cfg, tmp_path / "fine")
    state = torch.load(summary["last_checkpoint"], weights_only=False)["model"]
    for key, value in exported.model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-9)
    wrong = tiny_config(tmp_path, data=data, trainer=start, seq_len=32, num_layers=3, num_experts=8)
    # CheckpointMismatchError: moe-train prints it as one line, without a traceback.
    with pytest.raises(
        CheckpointMismatchError, match="needs: model.num_layers=2 .config: 3., model.num_experts=4 .config: 8"
    ):
        train(wrong, tmp_path / "wrong")


def test_init_from_names_a_router_mismatch_and_a_missing_folder(tokenised_run, tmp_path):
    run_dir, folder = tokenised_run
    exported = load_run(run_dir)
    data = {"source": "bin", "path": exported.cfg.data.path, "vocab_size": exported.vocab_size}
    relu = tiny_config(tmp_path, router="relu", data=data, trainer={"init_from": str(folder)}, seq_len=32)
    with pytest.raises(CheckpointMismatchError, match=r"it needs: router.name=topk \(config: relu\)$"):
        train(relu, tmp_path / "relu")
    missing = tiny_config(tmp_path, data=data, trainer={"init_from": str(tmp_path)}, seq_len=32)
    with pytest.raises(CheckpointMismatchError, match="is not a Hugging Face model folder .no config.json."):
        train(missing, tmp_path / "missing")


@torch.no_grad()
def test_a_merged_model_exports_at_its_original_router_width(tmp_path):
    import moe.compress  # noqa: F401 (registers the "merged" router)

    model = random_gpt(num_experts=2, router="merged", router_kwargs={"source_experts": 4, "source_router": "topk"})
    for _, layer in moe_layers(model):
        layer.router.expert_to_group.copy_(torch.tensor([1, 0, 0, 1]))
    interop.to_hf_model(model).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.num_local_experts == 4
    ids = torch.randint(0, 40, (2, 32))
    torch.testing.assert_close(hf(ids).logits, model(ids)[0], rtol=0, atol=1e-4)
