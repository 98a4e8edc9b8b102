"""The mutation harness itself, on a tiny fake package and a fake test: one mutant is killed, one
survives (the test never checks the boundary), the real tree is never written, and the mutations
splice only the node they name."""
import pytest

from megagsm.testing.mutate import apply_mutant, find_mutants, run, sample, split_equivalent, stale_equivalents

FAKE = '''"""A docstring with 1 + 2 in it."""


def add(a, b):
    return a + b


def is_positive(x):
    if x is None:
        raise ValueError(f"x must be given, got {1 + 1}")
    return x > 0
'''

FAKE_TEST = '''from fakepkg.fake import add, is_positive


def test_add():
    assert add(2, 3) == 5


def test_is_positive():
    assert is_positive(5) and not is_positive(-5)
'''


def test_find_and_apply_touch_only_the_named_node():
    mutants = find_mutants("fakepkg/fake.py", FAKE)
    kinds = sorted(m.description for m in mutants)
    # docstring, raise message and f-string are skipped: only the two operators and the 0 remain
    assert kinds == ["Add -> Sub", "Gt -> GtE", "Is -> IsNot", "constant 0 -> 1"]
    gt = next(m for m in mutants if m.description == "Gt -> GtE")
    mutated = apply_mutant(FAKE, gt)
    assert mutated == FAKE.replace("return x > 0", "return (x >= 0)")
    assert find_mutants("fakepkg/fake.py", FAKE, functions=["add"])[0].description == "Add -> Sub"
    assert len(find_mutants("fakepkg/fake.py", FAKE, functions=["add"])) == 1
    # sampling is deterministic and keeps source order
    many = mutants * 5
    assert sample(many, 3, "seed") == sample(many, 3, "seed") and len(sample(many, 3, "seed")) == 3


@pytest.mark.parametrize("fork", [False, True])
def test_a_killed_and_a_surviving_mutant(tmp_path, fork):
    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    (tmp_path / "fakepkg" / "fake.py").write_text(FAKE)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(FAKE_TEST)
    targets = {"fakepkg/fake.py": {"tests": ["tests/test_fake.py"]}}
    report = run(tmp_path, targets, jobs=2, progress=lambda *_: None, fork=fork)
    status = {m.description: m.status for m in report.mutants}
    assert status["Add -> Sub"] == "killed"
    assert status["Gt -> GtE"] == "survived"      # is_positive(0) is never checked
    assert status["constant 0 -> 1"] == "survived"  # x > 1 vs x > 0: 5 and -5 cannot tell
    assert status["Is -> IsNot"] == "killed"        # raises for every real x
    assert report.caught == 2 and report.judged == 4 and report.score == 0.5
    assert "fakepkg/fake.py:11:12" in report.text() and "score: 2/4" in report.text()
    assert (tmp_path / "fakepkg" / "fake.py").read_text() == FAKE   # the real tree is untouched


def test_equivalent_mutants_are_recorded_not_run(tmp_path):
    """An EQUIVALENT entry matches by module, line text, mutation (and replacement): that mutant is
    reported with its reason and never run; an entry matching nothing is reported stale."""
    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    (tmp_path / "fakepkg" / "fake.py").write_text(FAKE)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_fake.py").write_text(FAKE_TEST)
    entry = {"module": "fakepkg/fake.py", "line": "return x > 0", "mutation": "Gt -> GtE", "why": "a reason"}
    stale = {**entry, "line": "return x > 1"}
    run_these, equivalent = split_equivalent(find_mutants("fakepkg/fake.py", FAKE), [entry])
    assert [m.description for m in equivalent] == ["Gt -> GtE"] and equivalent[0].why == "a reason"
    assert "Gt -> GtE" not in {m.description for m in run_these} and len(run_these) == 3
    assert split_equivalent(find_mutants("fakepkg/fake.py", FAKE), [{**entry, "replacement": "(x < 0)"}])[1] == []
    assert stale_equivalents(tmp_path, [entry, stale]) == [stale]
    add = {"module": "fakepkg/fake.py", "line": "return a + b", "mutation": "Add -> Sub", "why": "a reason"}
    report = run(tmp_path, {"fakepkg/fake.py": {"tests": ["tests/test_fake.py"], "functions": ["add"]}},
                 progress=lambda *_: None, fork=True, equivalent=[add])
    assert [m.status for m in report.equivalent] == ["equivalent"] and report.mutants == []
    assert "recorded as equivalent" in report.text() and "fakepkg/fake.py:5:12" in report.text()


def test_slow_tests_run_only_when_asked(tmp_path):
    from megagsm.testing.isolated_pytest import run_tests

    (tmp_path / "test_slow.py").write_text("import pytest\n\n@pytest.mark.slow\ndef test_fails():\n    assert False\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    assert run_tests(tmp_path, ["test_slow.py"], 120, fork=True)[0] == "error"  # deselected: "no tests ran"
    assert run_tests(tmp_path, ["test_slow.py"], 120, fork=True, slow=True)[0] == "failed"
