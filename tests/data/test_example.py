from sapo.data.example import Example, ExampleList, heldout_split


def test_example_defaults_are_not_shared():
    a, b = Example("q", "1"), Example("q", "1")
    a.images.append("x.png")
    a.meta["k"] = 1
    assert b.images == [] and b.meta == {}


def test_example_list_summary():
    examples = ExampleList([Example("q", "1")], source="f.jsonl", skipped={"malformed JSON": 2})
    assert examples.summary() == "1 examples from f.jsonl (skipped 2: 2 malformed JSON)"


def test_heldout_split_fraction_and_stability():
    sides = [heldout_split(f"problem {i}") for i in range(5000)]
    assert 0.17 < sides.count("test") / 5000 < 0.23
    assert heldout_split("problem 1") == heldout_split("problem 1")
