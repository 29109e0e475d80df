"""Code fingerprints: editing one method's module changes only its jobs' hash."""
import shutil

import pytest

from tokenreduction import provenance


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    dst = tmp_path / "tokenreduction"
    shutil.copytree(provenance.PACKAGE, dst, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "PACKAGE", dst)
    monkeypatch.setattr(provenance, "REDUCTION", dst / "reduction")
    provenance.method_files.cache_clear()
    yield dst
    provenance.method_files.cache_clear()


def _hashes():
    provenance.method_files.cache_clear()
    return {m: provenance.code_hash(("model", "train"), m) for m in ("tome", "tomecis", "topk", "evit", None)}


def test_editing_a_method_changes_only_the_jobs_that_run_it(package_copy):
    before = _hashes()
    path = package_copy / "reduction" / "topk.py"
    path.write_text(path.read_text() + "\n# edited\n")
    after = _hashes()
    # evit imports topk's score function, so it reruns too; tome does not
    assert after["topk"] != before["topk"] and after["evit"] != before["evit"]
    assert after["tome"] == before["tome"] and after["tomecis"] == before["tomecis"] and after[None] == before[None]


def test_shared_helpers_count_for_the_methods_that_import_them(package_copy):
    before = _hashes()
    path = package_copy / "reduction" / "bipartite.py"
    path.write_text(path.read_text() + "\n# edited\n")
    after = _hashes()
    assert after["tome"] != before["tome"] and after["tomecis"] != before["tomecis"]
    assert after["topk"] == before["topk"]


def test_shared_model_code_changes_every_job(package_copy):
    before = _hashes()
    path = package_copy / "models" / "blocks.py"
    path.write_text(path.read_text() + "\n# edited\n")
    after = _hashes()
    assert all(after[m] != before[m] for m in before)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="known methods: .*tome"):
        provenance.method_files("nosuch")
