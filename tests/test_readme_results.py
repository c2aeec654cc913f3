"""The README's results section is generated from the committed results, never typed by hand."""

from benchmarks import readme_results


def test_readme_results_section_is_generated():
    assert readme_results.main(["--check"]) == 0, "run `python -m benchmarks.readme_results`"
