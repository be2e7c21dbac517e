"""README.md's configuration reference is the table generated from the Config object."""

from __future__ import annotations

import gen_readme_keys


def test_readme_configuration_reference_is_generated_from_the_config():
    readme = gen_readme_keys.README.read_text(encoding="utf-8")
    assert gen_readme_keys.START in readme and gen_readme_keys.END in readme
    assert readme == gen_readme_keys.render(readme), "stale: run python tools/gen_readme_keys.py"


def test_render_replaces_only_the_marked_section():
    text = f"intro\n{gen_readme_keys.START}\nold table\n{gen_readme_keys.END}\noutro\n"
    out = gen_readme_keys.render(text)
    assert out.startswith(f"intro\n{gen_readme_keys.START}\n### model\n") and out.endswith(f"{gen_readme_keys.END}\noutro\n")
    assert "old table" not in out and "| `eval_ref_cache_dir` |" in out
