"""Importing a reference (IBLlama) miner checkpoint: the served model is the reference's, token for token.

The reference is re-implemented in tests/reference_a2a.py from its source (torchtune at the
commit it pins, and the evaluator repository's models/ and tune_recipes/gen.py); a tiny random
model is built in its layout, imported, and served by both engines.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from embcap.candidates import candidate_plan
from embcap.checkpoint import CaptionModelSpec, DecoderSource, PromptTemplate, load_checkpoint
from embcap.engines import create_engine, generate_blocking
from embcap.generation import CaptionGenerator, prompt_ids
from embcap.inputs import realistic_embeddings
from embcap.projector import load_projector
from embcap.sampling import choose_tokens
from export.options import ExportOptions
from export.repository import export_repository
from reference_a2a import CORPUS, START_VIDEO, InferenceRecipe, Shape, make_reference_repo
from training.import_reference import import_reference, main
from training.reference_format import Architecture
from training.reference_tokenizer import ReferenceFormatError

ROWS = 8  # two of the reference's 4-row batches
MAX_NEW = 40
TOLERANCE = 1e-4  # fp32 logits of a model whose logits reach ~10


def tiny_shape(vocab: int) -> Shape:
    return Shape(vocab=vocab, layers=2, heads=4, kv_heads=2, dim=64, hidden=128, max_seq_len=512)


def architecture(shape: Shape) -> Architecture:
    """The same shape as the importer's Architecture (what llama3_8b() is for the real model)."""
    return Architecture(vocab_size=shape.vocab, num_layers=shape.layers, num_heads=shape.heads,
                        num_kv_heads=shape.kv_heads, embed_dim=shape.dim, intermediate_dim=shape.hidden,
                        max_seq_len=shape.max_seq_len, norm_eps=shape.norm_eps, rope_base=shape.rope_base)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    repo, shape = make_reference_repo(tmp_path_factory.mktemp("miner") / "miner", tiny_shape, max_new_tokens=MAX_NEW)
    return repo, shape, InferenceRecipe(repo, shape)


@pytest.fixture(scope="module")
def imported(reference, tmp_path_factory) -> Path:
    repo, shape, _ = reference
    return import_reference(repo, tmp_path_factory.mktemp("imported") / "checkpoint", arch=architecture(shape),
                            log=quiet)


def served(checkpoint_dir: Path, **generation) -> tuple[CaptionGenerator, torch.nn.Module]:
    checkpoint = load_checkpoint(checkpoint_dir)
    spec = checkpoint.spec
    if generation:
        spec = spec.model_copy(update={"generation": spec.generation.model_copy(update=generation)})
    generator = CaptionGenerator.load(spec, checkpoint.local_decoder_path())
    projector = load_projector(checkpoint.projector_path, spec.embedding_dim, generator.hidden_size,
                               spec.prefix_length)
    return generator, projector


@pytest.fixture(scope="module")
def greedy(imported):
    return served(imported, do_sample=False)


@pytest.fixture(scope="module")
def embeddings() -> torch.Tensor:
    return torch.from_numpy(realistic_embeddings(ROWS, seed=1))


@pytest.fixture(scope="module")
def reference_greedy(reference, embeddings):
    """The reference's greedy run (top-k 1 through its own sampler): captions, per-step logits and tokens."""
    _, _, recipe = reference
    captions, logits, tokens = [], [], []
    for start in range(0, ROWS, 4):
        record, record_tokens = [], []
        captions += recipe.generate_batch(embeddings[start:start + 4], top_k=1, record=record,
                                          record_tokens=record_tokens)
        logits.append(torch.stack(record, dim=1))  # [4, steps, V]
        tokens += [list(row) for row in zip(*record_tokens)]
    return captions, logits, tokens


def caption_tokens(recipe: InferenceRecipe, tokens: list[int]) -> tuple[list[int], str]:
    """A row's tokens up to its end (<|eot_id|>, or EOS where decode truncates), and why it ended."""
    tokenizer = recipe._tokenizer
    for index, token in enumerate(tokens):
        if token in (tokenizer.eot_id, tokenizer.eos_id):
            return tokens[:index], "eot" if token == tokenizer.eot_id else "eos"
    return tokens, "max"


def test_the_prompt_is_the_reference_prompt_with_the_same_positions_overwritten(reference, greedy, embeddings):
    _, _, recipe = reference
    generator, projector = greedy
    tokens = recipe.prompt_tokens()
    context = sorted(recipe.extract_mm_context(embeddings[0], tokens))
    perception = generator.spec.prefix_length
    assert perception == 2 and generator.spec.prompt.prefix_slots == (0, 0, 1)
    first, overwritten = context[0], len(context) + perception - 1  # through the end marker
    ids = prompt_ids(generator.tokenizer, generator.spec)
    assert ids.before == tokens[:first] and ids.after == tokens[first + overwritten:]
    assert tokens[first - 1] == recipe._tokenizer.tt_model.encode(START_VIDEO, allowed_special="all")[0]
    assert generator.prompt_length == len(tokens)

    embedding = recipe._model.tok_embeddings  # what the reference's first layer received
    embedding.set_context([recipe.extract_mm_context(e, tokens) for e in embeddings[:4]])
    with torch.no_grad():
        theirs = embedding(torch.tensor([tokens] * 4))
        ours = generator.prompt_embeddings(projector(embeddings[:4]))
    embedding.set_context([])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # one row at a time there, batched here


def test_greedy_captions_and_logits_match_the_reference_in_both_engines(reference, greedy, embeddings,
                                                                        reference_greedy):
    _, _, recipe = reference
    generator, projector = greedy
    captions, logits, tokens = reference_greedy
    ends = [caption_tokens(recipe, row) for row in tokens]
    expected = [recipe._tokenizer.decode(row).strip() for row, _ in ends]
    # The cases this test means to cover are there: rows ending on <|eot_id|>, on a special token the reference
    # turned into EOS, and at max_new_tokens; none blank.
    assert {"eot", "eos", "max"} <= {why for _, why in ends} and all(row for row, _ in ends)
    padding = recipe._tokenizer.decode([0])  # what the reference wrote after a row's end: token 0
    for caption, (row, _) in zip(captions, ends):
        text = recipe._tokenizer.decode(row)
        assert caption.startswith(text) and set(caption[len(text):]) <= {padding}

    with torch.inference_mode():
        prefix = projector(embeddings)
        prompt = generator.prompt_embeddings(prefix)
        first = generator.model(inputs_embeds=prompt).logits[:, -1]
        reference_first = torch.cat([batch[:, 0] for batch in logits])
        torch.testing.assert_close(first, reference_first, rtol=0, atol=TOLERANCE)
        # ... and at every later step of each row, fed the reference's own tokens
        for row, (generated, _) in enumerate(ends):
            theirs = logits[row // 4][row % 4]
            steps = min(len(generated) + 1, theirs.shape[0])
            embeds = generator.model.get_input_embeddings()(torch.tensor([generated[:steps - 1]]))
            forward = generator.model(inputs_embeds=torch.cat([prompt[row:row + 1], embeds], dim=1)).logits
            torch.testing.assert_close(forward[0, -steps:], theirs[:steps], rtol=0, atol=TOLERANCE)

    for name in ("hf", "continuous"):
        engine = create_engine(name, generator, slots=ROWS)
        try:
            assert generate_blocking(engine, prefix.numpy()) == expected, name
        finally:
            engine.close()


def test_sampling_draws_from_the_reference_distribution(reference, imported, reference_greedy):
    """Temperature and top-k as the reference's sampler applied them: the same distribution, other draws."""
    import reference_a2a

    _, _, recipe = reference
    spec = load_checkpoint(imported).spec
    sampling = candidate_plan(spec).sampling
    assert (sampling.temperature, sampling.top_k) == (recipe.cfg.temperature, recipe.cfg.top_k)
    logits = reference_greedy[1][0][0, 0]  # a row's first-step logits
    draws, vocab = 20_000, logits.shape[-1]
    torch.manual_seed(0)
    theirs = reference_a2a.sample(logits.expand(draws, -1), recipe.cfg.temperature, recipe.cfg.top_k)[:, 0]
    ours = choose_tokens(logits.expand(draws, -1).clone(), torch.zeros(draws, dtype=torch.bool),
                         torch.arange(draws), torch.full((draws,), 30), sampling)
    p_theirs = torch.bincount(theirs.long(), minlength=vocab) / draws
    p_ours = torch.bincount(ours, minlength=vocab) / draws
    assert 0.5 * (p_theirs - p_ours).abs().sum() < 0.05  # sampling noise alone is ~0.03 here
    assert set(ours.tolist()) <= set(torch.topk(logits, recipe.cfg.top_k).indices.tolist())


def test_three_perception_tokens_overwrite_past_the_end_marker(tmp_path, embeddings):
    repo, shape = make_reference_repo(tmp_path / "miner", tiny_shape, perception_tokens=3, max_new_tokens=2, seed=3)
    out = import_reference(repo, tmp_path / "checkpoint", arch=architecture(shape), log=quiet)
    generator, projector = served(out, do_sample=False)
    assert generator.spec.prompt.prefix_slots == (0, 0, 0, 1, 2)
    recipe, record = InferenceRecipe(repo, shape), []
    recipe.generate_batch(embeddings[:4], top_k=1, record=record)
    with torch.inference_mode():
        ours = generator.model(inputs_embeds=generator.prompt_embeddings(projector(embeddings[:4]))).logits[:, -1]
    assert generator.prompt_length == len(recipe.prompt_tokens())
    torch.testing.assert_close(ours, record[0], rtol=0, atol=TOLERANCE)


def test_the_served_tokenizer_encodes_and_decodes_as_the_reference(reference, greedy):
    _, _, recipe = reference
    tokenizer, theirs = greedy[0].tokenizer, recipe._tokenizer
    texts = [*CORPUS.split(". "), "  odd   spacing\n\n\tand 12345 digits!!", "ünïcödé 日本語 🎉", "it's we'll"]
    for text in texts:
        ids = theirs.encode(text, False, False)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == theirs.decode(ids)
    marked = theirs.encode("a cat<|start_image|> sleeps", False, False)
    assert tokenizer.decode(marked, skip_special_tokens=True) == "a cat<|start_image|> sleeps"


def test_the_import_exports_and_says_where_it_came_from(imported, reference, tmp_path):
    repo, _, _ = reference
    card = (imported / "MODEL_CARD.md").read_text()
    assert "`meta_model_0.pt`" in card and "Not used: `adapter_0.pt`, `hotkey.txt`" in card
    assert "`inference.max_new_tokens` = 300" in card  # the evaluator's override that generate_batch never read
    assert load_checkpoint(imported).spec.generation.max_new_tokens == MAX_NEW
    assert not list(imported.parent.glob(".checkpoint.*"))  # no staging folder left
    umask = os.umask(0)
    os.umask(umask)
    assert all(path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask
               for path in [imported, *imported.rglob("*")])  # the container reads it as nobody
    export_repository(imported, tmp_path / "repo", ExportOptions(max_batch_size=4, decoder_threads=1), log=quiet)


def _edit_config(repo: Path, key: str, value) -> None:
    config = OmegaConf.load(repo / "training_config.yml")
    if value is None:
        parent, _, leaf = key.rpartition(".")
        del (OmegaConf.select(config, parent) if parent else config)[leaf]
    else:
        OmegaConf.update(config, key, value)
    OmegaConf.save(config, repo / "training_config.yml")


def _add_tensor(repo: Path, key: str, shape: tuple[int, ...]) -> None:
    state = torch.load(repo / "meta_model_0.pt", weights_only=True)
    state[key] = torch.zeros(shape)
    torch.save(state, repo / "meta_model_0.pt")


REFUSALS = {
    "perception_tokens missing": (lambda r: _edit_config(r, "model.perception_tokens", None),
                                  "'model.perception_tokens' missing"),
    "no {video}": (lambda r: _edit_config(r, "inference.prompt_template", "Caption the video."), "{video}"),
    "{image} too": (lambda r: _edit_config(r, "inference.prompt_template", "{image} {video}"), "{image}"),
    "quantized": (lambda r: _edit_config(r, "inference.quantizer", {"_component_": "q.Int8"}), "inference.quantizer"),
    "other tokenizer": (lambda r: _edit_config(r, "tokenizer._component_", "models.other"), "tokenizer._component_"),
    "top_k zero": (lambda r: _edit_config(r, "top_k", 0), "top_k"),
    "lora tensor left": (lambda r: _add_tensor(r, "layers.0.attention.wq.lora_a.weight", (8, 64)), "lora_a"),
    "perception mismatch": (lambda r: _edit_config(r, "model.perception_tokens", 3),
                            "tok_embeddings.proj_to_llama.0.weight has shape"),
    "two weight files": (lambda r: shutil.copy(r / "meta_model_0.pt", r / "meta_model_1.pt"), "--weights"),
    "no tokenizer": (lambda r: (r / "tokenizer.model").unlink(), "--tokenizer"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_it_does_not_understand_is_refused_by_name(case, reference, tmp_path):
    repo, shape, _ = reference
    copy = shutil.copytree(repo, tmp_path / "miner")
    change, message = REFUSALS[case]
    change(copy)
    with pytest.raises(ReferenceFormatError) as caught:
        import_reference(copy, tmp_path / "out", arch=architecture(shape), log=quiet)
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_the_command_line_imports_the_reference_8b_shape_only(reference, tmp_path, capsys):
    repo, _, _ = reference
    assert main([str(repo), str(tmp_path / "out")]) == 2
    assert "not the decoder's vocabulary of 128256" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main([str(repo), str(tmp_path / "taken")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_prefix_slots_must_name_prefix_vectors():
    with pytest.raises(ValueError, match="prefix_slots"):
        CaptionModelSpec(decoder=DecoderSource(path="decoder"), prefix_length=2,
                         prompt=PromptTemplate(prefix_slots=(0, 2)))
    assert CaptionModelSpec(decoder=DecoderSource(path="decoder")).prompt.prefix_slots is None  # 0..P-1
