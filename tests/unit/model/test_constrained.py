"""Constrained decoding on the tiny random-weight model: xgrammar's masks, generate(..., schemas=) (batched == one at a
time, truncation, mixed schemas, sampling), and the Generate stage's typed `answer` column and error rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from pipeline.config import parse_job  # noqa: E402
from pipeline.errors import SchemaError  # noqa: E402
from pipeline.structured.answers import TruncatedAnswer, answer_type, parse_answer, to_arrow  # noqa: E402
from pipeline.model.constrained import GrammarBackend, blocked_token_ids, tokenizer_info, unspellable  # noqa: E402
from pipeline.structured.grammar import GRAMMAR_OPTIONS, check_grammar, grammar_schema  # noqa: E402
from pipeline.model.transformers_engine import InternVLEngine  # noqa: E402
from pipeline.structured.schema import check_schema  # noqa: E402
from pipeline.stages.generate import Generate  # noqa: E402
from tests.schemas import SCHEMA, SCHEMA_TYPE, SMALL  # noqa: E402
from tests.unit.model.test_transformers_engine import preprocessed  # noqa: E402
from tests.conftest import pattern_image  # noqa: E402

QUESTIONS = ["Describe the animal.", "What is it?", "Answer in JSON now please."]  # three prompt lengths
MAX_NEW_TOKENS = 160


# ------------------------------------------------------------------------------------------- xgrammar, no model


def test_check_grammar_locates_what_xgrammar_cannot_compile():
    check_grammar(SCHEMA)
    bad = {"type": "object", "properties": {"name": {"type": "string", "pattern": r"\bword\b"}}}
    check_schema(bad)  # Python's re accepts it; xgrammar does not
    with pytest.raises(SchemaError, match=r"schema \$\.properties\.name: the grammar backend \(xgrammar\) cannot "
                                          r"compile this schema: .*Word boundary"):
        check_grammar(bad)


def test_grammar_is_compact_and_the_one_vllm_compiles():
    """vLLM 0.32 with disable_any_whitespace compiles json=grammar_schema(s) with exactly these options."""
    assert GRAMMAR_OPTIONS == {"any_whitespace": False, "separators": (",", ":")}
    grammar = str(xgr.Grammar.from_json_schema(json.dumps(grammar_schema(SCHEMA)), **GRAMMAR_OPTIONS))
    rules = "\n".join(line for line in grammar.splitlines() if line.startswith("root"))
    assert '":"' in rules and '","' in rules and '": "' not in rules and '", "' not in rules


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_tiny_tokenizer_spells_every_json_character(tokenizer):
    info = tokenizer_info(tokenizer, stop_token_ids=[tokenizer.eos_token_id])
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL
    assert unspellable(info) == []


def _allowed(info, schema, prefix):
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), **GRAMMAR_OPTIONS))
    assert matcher.accept_string(prefix)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    logits = torch.zeros(1, info.vocab_size)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_special_tokens_are_never_allowed_inside_an_answer(tokenizer):
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    specials = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    assert set(blocked_token_ids(tokenizer, [tokenizer.eos_token_id])) >= specials
    plain = xgr.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=[tokenizer.eos_token_id])
    assert specials <= _allowed(plain, schema, '{"s":"')  # xgrammar's default: <IMG_CONTEXT> spelled as text
    fixed = tokenizer_info(tokenizer, stop_token_ids=[tokenizer.eos_token_id])
    assert not specials & _allowed(fixed, schema, '{"s":"')
    assert _allowed(fixed, schema, '{"s":"x"}') == {tokenizer.eos_token_id}  # closed: only EOS


def test_length_bounded_strings_never_hold_raw_control_characters(tokenizer):
    """xgrammar 0.2.9 lets U+0000-U+001F into strings with minLength/maxLength; grammar_schema rewrites them."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 4}},
              "required": ["s"]}
    raw = xgr.GrammarMatcher(xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer)).compile_json_schema(
        json.dumps(schema), **GRAMMAR_OPTIONS))
    assert raw.accept_string('{"s":"a\x13"}')  # the bug
    backend = GrammarBackend(tokenizer, stop_token_ids=[tokenizer.eos_token_id])

    def accepts(text):
        return xgr.GrammarMatcher(backend.compile(schema)).accept_string(text)

    assert not accepts('{"s":"a\x13"}') and not accepts('{"s":"a\tb"}')
    assert accepts('{"s":"abcd"}') and not accepts('{"s":"abcde"}') and not accepts('{"s":""}')
    assert not accepts('{"s": "abcd"}')  # no free whitespace
    assert grammar_schema(schema)["properties"]["s"] == {"type": "string", "pattern": '^[^\\x00-\\x1f"\\\\]{1,4}$'}


# ------------------------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def engine(tiny_model):
    return InternVLEngine.load(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def batch(engine):
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 256, (1, 448, 448, 3), dtype=np.uint8) for _ in range(20)]
    prompts = [engine.prompt_ids(QUESTIONS[i % len(QUESTIONS)], [1]) for i in range(20)]
    return prompts, samples


@pytest.fixture(scope="module")
def batched(engine, batch):
    prompts, samples = batch
    return engine.generate(prompts, samples, max_new_tokens=MAX_NEW_TOKENS, schemas=[SCHEMA] * len(prompts))


def test_every_answer_of_a_20_sample_batch_parses_and_validates(batched, tmp_path):
    values = []
    for g in batched:
        assert g.finished, g.text
        values.append(parse_answer(g.text, SCHEMA, max_new_tokens=MAX_NEW_TOKENS, finished=g.finished))
    assert [list(v) for v in values] == [[k for k in SCHEMA["properties"] if k in v] for v in values]  # declared order
    assert len({g.text for g in batched}) > 10  # answers depend on the image
    assert {v["kind"] for v in values} <= {"cat", "dog", "bird"}
    assert all(isinstance(v["count"], int) and 0 <= v["count"] <= 20 for v in values)
    pq.write_table(pa.table({"response": [g.text for g in batched], "answer": to_arrow(values, SCHEMA)}),
                   tmp_path / "out.parquet")
    answer = pq.read_table(tmp_path / "out.parquet").column("answer")
    assert answer.type == SCHEMA_TYPE and answer.null_count == 0
    assert pc.struct_field(answer, "count").to_pylist() == [v["count"] for v in values]


def test_batched_answers_equal_one_at_a_time(engine, batch, batched, monkeypatch):
    prompts, samples = batch
    assert len(engine.language_groups(prompts)) == len(QUESTIONS)  # CPU: one call per prompt length
    for i in range(6):  # two of each length (all 20 one at a time: the pipeline test)
        alone = engine.generate([prompts[i]], [samples[i]], max_new_tokens=MAX_NEW_TOKENS, schemas=[SCHEMA])[0]
        assert alone.token_ids == batched[i].token_ids and alone.text == batched[i].text
    # the GPU way: all 20 in one left-padded batch
    monkeypatch.setattr(engine, "language_groups", lambda p: [list(range(len(p)))])
    padded = engine.generate(prompts, samples, max_new_tokens=MAX_NEW_TOKENS, schemas=[SCHEMA] * len(prompts))
    assert [g.token_ids for g in padded] == [g.token_ids for g in batched]


def test_a_batch_mixes_schemas_and_free_prompts(engine, batch, batched, monkeypatch):
    prompts, samples = batch
    prompts, samples = prompts[:6], samples[:6]
    free = engine.generate(prompts, samples, max_new_tokens=12)
    monkeypatch.setattr(engine, "language_groups", lambda p: [list(range(len(p)))])  # one padded batch
    schemas = [SCHEMA, None, SMALL, SCHEMA, None, SMALL]
    mixed = engine.generate(prompts, samples, max_new_tokens=MAX_NEW_TOKENS, schemas=schemas)
    for i, (schema, g) in enumerate(zip(schemas, mixed)):
        if schema is None:  # unconstrained rows are untouched (free ran only 12 tokens: compare its prefix)
            assert g.token_ids[:12] == free[i].token_ids
            assert g.text[:1] != "{"
        else:
            assert g.finished
            parse_answer(g.text, schema, max_new_tokens=MAX_NEW_TOKENS, finished=True)
            if schema is SCHEMA:
                assert g.token_ids == batched[i].token_ids


def test_questions_of_one_sample_each_with_its_own_schema(engine, batch, batched):
    """vqa with several questions per sample: the vision encoder runs once, each prompt decodes under its schema."""
    prompts, samples = batch
    out = engine.generate([prompts[0], prompts[1], prompts[3]], [samples[0]], owners=[0, 0, 0],
                          max_new_tokens=MAX_NEW_TOKENS, schemas=[SCHEMA, SMALL, None])
    first = parse_answer(out[0].text, SCHEMA, max_new_tokens=MAX_NEW_TOKENS, finished=out[0].finished)
    second = parse_answer(out[1].text, SMALL, max_new_tokens=MAX_NEW_TOKENS, finished=out[1].finished)
    assert set(second) == {"ok", "n"} and out[0].token_ids == batched[0].token_ids
    column = to_arrow([first, second, None], answer_type([SCHEMA, SMALL]))
    assert column.type.names == [*SCHEMA["properties"], "ok", "n"] and column.null_count == 1


def test_small_max_new_tokens_gives_truncated(engine, batch):
    prompts, samples = batch
    out = engine.generate(prompts[:4], samples[:4], max_new_tokens=8, schemas=[SCHEMA] * 4)
    for g in out:
        assert not g.finished and len(g.token_ids) == 8 and g.text.startswith("{")
        with pytest.raises(TruncatedAnswer, match="max_new_tokens=8"):
            parse_answer(g.text, SCHEMA, max_new_tokens=8, finished=g.finished)


def test_sampling_stays_inside_the_schema(engine, batch):
    """Per-row sampling (model/sampling.RowSampler) draws only among the tokens the grammar allows."""
    prompts, samples = batch
    out = engine.generate(prompts[:6], samples[:6], max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=1.5,
                          top_p=0.9, seeds=list(range(3, 9)), schemas=[SCHEMA] * 6)
    for g in out:
        assert g.finished, g.text
        parse_answer(g.text, SCHEMA, max_new_tokens=MAX_NEW_TOKENS, finished=True)


def test_grammar_backend_for_engine(engine):
    backend = engine.grammar
    assert backend is engine.grammar  # one per replica
    assert backend.vocab_size == engine.model.get_output_embeddings().weight.shape[0]
    assert backend.compile(SCHEMA) is backend.compile(json.loads(json.dumps(SCHEMA)))  # cached
    with pytest.raises(RuntimeError, match="built for 2 rows got a batch of 3"):
        backend.logits_processor([SCHEMA, None])(torch.zeros((3, 0), dtype=torch.long),
                                                 torch.zeros(3, backend.vocab_size))


# ------------------------------------------------------------------------------------------- the Generate stage


def test_generate_stage_writes_typed_answers_and_error_rows(engine, tmp_path):
    """Per-question schemas (one free question too), a bad input; then the same job cut short: truncated rows."""
    job = {"task": "vqa", "input": "x", "output": "y", "model": "m", "schema": SMALL,
           "questions": [{"question": "Describe it.", "schema": SCHEMA}, "Is it ok?"],
           "generation": {"max_new_tokens": MAX_NEW_TOKENS}}
    images = {"a.png": pattern_image(448, 448), "b.png": pattern_image(640, 480), "c.png": None}
    batch = preprocessed(parse_job(job), tmp_path, images)
    table = Generate(parse_job(job), engine=engine)(batch)
    expected = answer_type([SMALL, SCHEMA])
    assert table.schema.field("answer").type == expected
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["s0#0", "s0#1", "s1#0", "s1#1", "s2#0", "s2#1"]
    for r in rows[:4]:
        assert r["status"] == "ok", r["error_message"]
        value = parse_answer(r["response"], SCHEMA if r["question_index"] == 0 else SMALL,
                             max_new_tokens=MAX_NEW_TOKENS, finished=True)
        assert r["answer"] == to_arrow([value], expected).to_pylist()[0]  # the other schema's fields null
    assert rows[4]["error_type"] == "not_found" and rows[4]["answer"] is None

    short = Generate(parse_job(job, overrides=["generation.max_new_tokens=6"]), engine=engine)(batch)
    assert short.schema.field("answer").type == expected  # no row parsed: the column keeps its type
    for r in short.to_pylist()[:4]:
        assert (r["status"], r["error_type"], r["answer"]) == ("error", "truncated", None)
        assert "max_new_tokens=6" in r["error_message"] and r["response"].startswith("{")
        assert r["num_generated_tokens"] == 6
