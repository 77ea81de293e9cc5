"""The report's page plan: which section builders run, in page order, and a generic section for
every other table of the run. Builders live in :mod:`.sections` (the run's own tables) and
:mod:`.measured` (the measurements' tables)."""
from __future__ import annotations

from typing import Any, Callable

from . import measured, views
from .similarity import TABLES as SIMILARITY_TABLES
from .similarity import encoding_section, similarity_section
from .sections import (IN_CARDS, Section, firing_section, histograms_section, layers_section, neurons_section, sinks_section,
                       slug, table_slot)

# Tables with a dedicated section (or shown inside the unit cards); any other is generic.
DEDICATED = ("layers", "heads", "extreme_heads", "cett_sweep", "cett_layers", "moe_experts", "outliers", "training_steps", *SIMILARITY_TABLES, *views.TABLES)


def build_sections(run: Any) -> list[Section]:
    """Every section the run has data for, in page order (the header is separate)."""
    builders: list[Callable[[Any], Section | None]] = [
        layers_section, histograms_section, firing_section, sinks_section, measured.extreme_heads, measured.cett_sweep,
        measured.cett_layers, measured.moe_experts, measured.outliers, measured.training_steps, similarity_section,
        encoding_section, views.lens_section,
        views.steering_section, views.attention_section, neurons_section,
    ]
    sections = [section for build in builders if (section := build(run)) is not None]
    taken = {section.id for section in sections}
    for name in run.tables:
        if name not in DEDICATED and name not in IN_CARDS:
            section_id = f"table-{slug(name)}"
            while section_id in taken:  # "a b" and "a-b" share a slug
                section_id += "-"
            taken.add(section_id)
            sections.append(Section(section_id, "Table:", table_slot(name), subject=name))
    return sections
