"""Sphinx configuration: furo theme, API from the docstrings, an executed example gallery."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "lightning_ntk"
author = "the lightning_ntk developers"
copyright = "2026, the lightning_ntk developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath"]
exclude_patterns = ["_build", "gallery_src/README.txt"]

html_theme = "furo"
html_title = "lightning_ntk"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

sphinx_gallery_conf = {
    "examples_dirs": "gallery_src",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
}
