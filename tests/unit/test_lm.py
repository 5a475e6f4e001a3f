"""Language models without Ray: text/JSONL reading, packing, streaming shards, HF models, LM pruning, config errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from orchestrator.config import compose
from orchestrator.config.validate import ConfigError
from orchestrator.data.text import load_text_splits, pack
from orchestrator.plan import build_plan

WORDS = "the a cat dog sat ran on under mat log and then quickly slowly".split()


def write_corpus(path: Path, lines: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + ".\n" for _ in range(lines)))
    return path


def container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def test_pack_cuts_windows_of_block_plus_one_that_share_one_token_and_drops_the_tail():
    blocks = pack([[1, 2, 3], [4, 5, 6, 7, 8]], block_size=3)
    assert blocks == [[1, 2, 3, 4], [4, 5, 6, 7]]  # 8 is a tail that cannot fill a window
    assert pack([[1, 2, 3]], block_size=3) == []


def test_byte_level_text_is_the_files_bytes_split_into_train_and_validation(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    splits = load_text_splits(str(corpus), block_size=32, val_fraction=0.2)
    raw = corpus.read_bytes()
    inputs, targets = splits.train[0]
    assert inputs.tolist() == list(raw[:32]) and targets.tolist() == list(raw[1:33])  # line breaks kept
    assert len(splits.val) > 0 and len(splits.train) > 3 * len(splits.val)
    assert splits.codec.decode(splits.codec.encode("héllo\n")) == "héllo\n"


def test_batched_reads_give_the_same_blocks_as_reads_one_by_one(tmp_path):
    # the DataLoader takes a batch through __getitems__ (one Arrow read); it must equal the per-example path
    from torch.utils.data import DataLoader

    train = load_text_splits(str(write_corpus(tmp_path / "corpus.txt")), block_size=16).train
    indices = [5, 0, 9, 9, 2]
    batched, single = train.__getitems__(indices), [train[i] for i in indices]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batched, single))
    inputs, targets = next(iter(DataLoader(train, batch_sampler=[indices])))
    assert inputs.shape == (5, 16) and torch.equal(inputs[1], single[1][0]) and torch.equal(targets[4], single[4][1])


def test_a_glob_of_jsonl_files_reads_the_text_field(tmp_path):
    for index in range(2):
        rows = [{"text": f"document {index} line {i} " * 3, "id": i} for i in range(60)]
        (tmp_path / f"part{index}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_text_splits(str(tmp_path / "*.jsonl"), block_size=16, val_fraction=0.1)
    text = bytes(splits.train[0][0].tolist()).decode()
    assert text == "document 0 line "
    with pytest.raises(ValueError, match="data.text_field='body'"):
        load_text_splits(str(tmp_path / "*.jsonl"), block_size=16, text_field="body")
    with pytest.raises(FileNotFoundError, match="data.path="):
        load_text_splits(str(tmp_path / "*.txt"))


def test_a_local_hugging_face_tokenizer_tokenizes_the_text(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = write_corpus(tmp_path / "corpus.txt")
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train([str(corpus)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    splits = load_text_splits(str(corpus), block_size=8, tokenizer=str(tmp_path / "tok"))
    inputs, _ = splits.train[0]
    assert int(inputs.max()) < tokenizer.get_vocab_size()
    decoded = splits.codec.decode(inputs.tolist()).replace(" ", "")  # word-level: spaces are not tokens
    assert len(decoded) > 8 and "".join(corpus.read_text().split()).startswith(decoded)


def test_streamed_text_gives_each_worker_its_own_shard_and_resumes_at_the_exact_batch(tmp_path):
    from orchestrator.train.data_order import StreamBatches, training_batches

    corpus = write_corpus(tmp_path / "corpus.txt", lines=300)
    splits = load_text_splits(str(corpus), block_size=16, streaming=True, val_blocks=8, shuffle_buffer=50)
    assert len(splits.val) == 8
    ranks = [training_batches(splits.train, 4, rank, 2, seed=0) for rank in range(2)]
    assert all(isinstance(r, StreamBatches) for r in ranks)
    first = [next(r.iterate_from(0))[0] for r in ranks]
    assert first[0].shape == (4, 16) and not torch.equal(first[0], first[1])
    stream = ranks[0].iterate_from(0)
    reference = [next(stream)[0] for _ in range(40)]  # crosses at least one epoch boundary of this shard
    resumed = ranks[0].iterate_from(23)
    for expected in reference[23:]:
        assert torch.equal(next(resumed)[0], expected)


@pytest.fixture(scope="module")
def llama():
    cfg = compose(["model=hf_llama", "data=text"]).cfg
    return instantiate(container(cfg.model))


def test_hf_models_build_from_config_and_return_token_logits(llama):
    gpt2 = instantiate(container(compose(["model=hf_causal_lm", "data=text"]).cfg.model))
    tokens = torch.randint(0, 256, (2, 12))
    for model in (gpt2, llama):
        assert model(tokens).shape == (2, 12, 256)
    assert 50_000 < sum(p.numel() for p in gpt2.parameters()) < 1_000_000


def test_pruning_a_llama_removes_heads_and_mlp_units_and_from_pretrained_loads_it(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from orchestrator.compress.lm_structured import prune_causal_lm

    smaller = prune_causal_lm(llama, heads_ratio=0.5, mlp_ratio=0.5)
    assert smaller.hf.config.num_attention_heads == 2 and smaller.hf.config.intermediate_size == 128
    assert sum(p.numel() for p in smaller.parameters()) < 0.75 * sum(p.numel() for p in llama.parameters())
    assert llama.hf.config.num_attention_heads == 4  # the input is untouched
    smaller.hf.save_pretrained(str(tmp_path / "pruned"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"), local_files_only=True)
    tokens = torch.randint(0, 256, (1, 16))
    logits = loaded(input_ids=tokens).logits
    assert torch.isfinite(logits).all() and torch.allclose(logits, smaller(tokens), atol=1e-5)


def test_pruning_keeps_the_most_important_units():
    from orchestrator.compress.lm_structured import prune_causal_lm

    gpt2 = instantiate(container(compose(["model=hf_causal_lm", "data=text"]).cfg.model))
    fc = gpt2.hf.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        fc.weight[:, :8] *= 100  # units 0-7 of layer 0 dominate
    smaller = prune_causal_lm(gpt2, mlp_ratio=0.75)
    assert smaller.hf.config.n_inner == 64
    assert torch.equal(smaller.hf.transformer.h[0].mlp.c_fc.weight[:, :8], fc.weight[:, :8])
    with pytest.raises(ValueError, match="heads_ratio"):
        prune_causal_lm(gpt2, heads_ratio=0.5)


def test_greedy_samples_continue_a_prompt():
    from orchestrator.train.samples import greedy_continuation

    for option in ("hf_causal_lm", "gpt"):  # Hugging Face and built-in models alike
        model = instantiate(container(compose([f"model={option}", "data=text"]).cfg.model)).eval()
        continuation = greedy_continuation(model, [84, 104, 101, 32], new_tokens=70, block_size=64)
        assert len(continuation) == 70 and all(0 <= t < 256 for t in continuation)


def test_a_missing_local_model_is_an_error_naming_the_key(tmp_path):
    cfg = compose(["model=hf_causal_lm", "data=text", f"model.pretrained_path={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="model.pretrained_path=.*no such directory"):
        build_plan(cfg, cwd=tmp_path)
    (tmp_path / "empty").mkdir()
    cfg = compose(["model=hf_causal_lm", "data=text", f"model.pretrained_path={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match="config.json"):
        build_plan(cfg, cwd=tmp_path)


def test_a_teacher_with_another_vocabulary_is_refused_before_anything_runs(tmp_path):
    import yaml

    from orchestrator.models.hf_causal_lm import hf_model_config

    wide = instantiate(container(compose(["model=hf_causal_lm", "data=text", "data.vocab_size=300"]).cfg.model))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.yaml").write_text(yaml.safe_dump(hf_model_config(wide)))  # as export writes it
    cfg = compose(["recipe=distill", "model=hf_causal_lm", "data=text", f"recipe.distill.teacher={tmp_path / 'teacher'}"])
    with pytest.raises(ConfigError, match=r"recipe.distill.teacher=300.*300 classes/tokens.*256"):
        build_plan(cfg, cwd=tmp_path)
    # a pretrained student's vocabulary is its config.json's, whatever the YAML says
    wide.hf.save_pretrained(str(tmp_path / "student"))
    narrow = instantiate(container(compose(["model=gpt", "data=text"]).cfg.model))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "model.yaml").write_text(yaml.safe_dump(container(compose(["model=gpt", "data=text"]).cfg.model)))
    cfg = compose(["recipe=distill", "model=hf_causal_lm", "data=text", f"model.pretrained_path={tmp_path / 'student'}", "data.tokenizer=null",
                   f"recipe.distill.teacher={tmp_path / 'gpt'}"])
    with pytest.raises(ConfigError, match=r"recipe.distill.teacher=256.*300"):
        build_plan(cfg, cwd=tmp_path)
    assert narrow(torch.zeros(1, 4, dtype=torch.long)).shape[-1] == 256


def test_head_pruning_of_gpt2_is_refused_when_planned(tmp_path):
    cfg = compose(["recipe=prune", "model=hf_causal_lm", "data=text", "recipe.input=0123456789abcdef0123456789abcdef",
                   "recipe.lm_structured.heads_ratio=0.5"])
    with pytest.raises(ConfigError, match="recipe.lm_structured.heads_ratio"):
        build_plan(cfg, cwd=tmp_path)
    cfg = compose(["recipe=prune", "model=gpt", "data=text", "recipe.input=0123456789abcdef0123456789abcdef",
                   "recipe.lm_structured.mlp_ratio=0.5"])
    with pytest.raises(ConfigError, match="recipe.lm_structured"):
        build_plan(cfg, cwd=tmp_path)


def test_a_local_pretrained_directory_loads_its_weights_and_plans(llama, tmp_path):
    llama.hf.save_pretrained(str(tmp_path / "pretrained"))
    overrides = ["model=hf_causal_lm", "data=text", f"model.pretrained_path={tmp_path / 'pretrained'}"]
    with pytest.raises(ConfigError, match="data.tokenizer=.*holds no tokenizer"):  # defaults to the model's directory
        build_plan(compose(overrides), cwd=tmp_path)
    composed = compose([*overrides, "data.tokenizer=null"])
    plan = build_plan(composed, cwd=tmp_path)
    cfg = composed.cfg
    assert plan.stages[0].memory.parameters == sum(p.numel() for p in llama.parameters())
    loaded = instantiate(container(cfg.model))
    tokens = torch.randint(0, 256, (1, 8))
    assert torch.allclose(loaded(tokens), llama(tokens), atol=1e-5)
