"""Metrics on hand-written predictions, malformed generations included, and generation on a tiny model."""

import pytest

from hetero_ray.contrib.evaluate import markdown_table, parse_entities, parse_relations, score, task_kind


def test_entity_parsing_normalizes_and_drops_malformed_items():
    assert parse_entities(" genre: Scary;  year: 1960 s") == [("genre", "scary"), ("year", "1960 s")]
    assert parse_entities("genre scary; : x; year:; title: a: b") == [("title", "a: b")]
    assert parse_entities("") == [] and parse_entities("none") == []


def test_entity_f1_counts_pairs_as_multisets():
    golds = ["genre: scary; year: 1960 s", "title: half baked"]
    preds = ["year: 1960 s; genre: scary", "title: half baked; title: half baked; actor: x"]
    m = score("ner", preds, golds)
    # 3 correct of 5 predicted (the duplicate counts once), 3 gold
    assert m["precision"] == pytest.approx(3 / 5) and m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(2 * 0.6 / 1.6) and m["score"] == m["f1"]


def test_malformed_generations_score_zero_without_error():
    m = score("ner", ["", "genre", "<unk> ;;; :"], ["genre: scary", "year: 1999", "title: up"])
    assert m == {"score": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}


def test_relation_parsing_splits_arguments_at_the_last_comma():
    text = "Live in: John Smith, Washington, D.C.; Work for: Ann, IBM; Kill: Oswald"
    assert parse_relations(text) == [("live in", "john smith, washington", "d.c."), ("work for", "ann", "ibm")]


def test_relation_f1_is_strict_on_all_three_parts():
    golds = ["Work for: Ann, IBM; Live in: Ann, Paris"]
    preds = ["Work for: Ann, IBM; Live in: Ann, London"]
    m = score("re", preds, golds)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5


def test_label_accuracy_and_kind_detection():
    assert score("label", ["Positive ", "neg"], ["positive", "positive"])["accuracy"] == 0.5
    assert task_kind([{"instruction": 'format "relation1: word1, word2"', "output": "a: b, c"}]) == "re"
    assert task_kind([{"instruction": "x", "output": "positive"}]) == "label"
    assert task_kind([{"instruction": "x", "output": "genre: scary"}]) == "ner"
    with pytest.raises(ValueError, match="predictions"):
        score("ner", ["a: b"], [])


def test_markdown_table_formats_floats_and_blanks():
    md = markdown_table({"m": {"a": 0.5}, "n": {"b": "x"}}, ["a", "b"])
    assert "| m | 0.500 |  |" in md and "| n |  | x |" in md


def test_generation_and_answer_loss_on_a_tiny_model(zoo):
    from hetero_ray.contrib import tiny
    from hetero_ray.contrib.evaluate import answer_loss, evaluate_model, generate, load_model

    model, tok = load_model(zoo["llama-base"], zoo["llama-lora"])
    records = tiny.task_records("movie", 5, seed=3)
    out = generate(model, tok, records, batch_size=2, max_new_tokens=5)
    assert len(out) == 5 and all(isinstance(o, str) for o in out)
    # left padding: a record's answer does not depend on its batch neighbours
    assert generate(model, tok, records[1:2], max_new_tokens=5) == out[1:2]
    loss = answer_loss(model, tok, records)
    assert loss > 0
    res = evaluate_model(model, tok, {"movie": records}, batch_size=2, max_new_tokens=5)["movie"]
    assert res.n == 5 and res.kind == "ner" and res.metrics["answer_loss"] == pytest.approx(loss)
