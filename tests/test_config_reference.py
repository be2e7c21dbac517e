"""docs/configuration.md's key reference is the table generated from the Config object."""

from __future__ import annotations

import gen_config_reference as gen


def test_configuration_reference_is_generated_from_the_config():
    page = gen.PAGE.read_text(encoding="utf-8")
    assert gen.START in page and gen.END in page
    assert page == gen.render(page), "stale: run python tools/gen_config_reference.py"


def test_render_replaces_only_the_marked_section():
    text = f"intro\n{gen.START}\nold table\n{gen.END}\noutro\n"
    out = gen.render(text)
    assert out.startswith(f"intro\n{gen.START}\n### model\n") and out.endswith(f"{gen.END}\noutro\n")
    assert "old table" not in out and "| `eval_ref_cache_dir` |" in out
