"""Sphinx helpers for the API reference (book/api.md), loaded through _config.yml.

1. napoleon reads the first line of an attribute's, data item's or property's docstring as
   "type: text" whenever it holds a colon, so prose such as "Gradients plus Hessian-vector
   products: the paper's unit of work." became a broken type reference. trlib writes no types
   there (annotations carry them), so those docstrings keep the text they were written with.
2. trlib re-exports names (``trlib.get_norm`` is ``trlib.norms.get_norm``; ``trlib.experiments.run``
   is defined in ``trlib.experiments.runner``), while a docstring refers to names as seen from
   the module that defines it (``:class:`Norm``` inside ``get_norm``). Where such a reference
   finds nothing under the name the reader sees, it resolves to the object of that name that
   the page documents at module level in trlib (or in the same class): the one in the module
   nearest to the reference's own, then the most public (shortest) name. A reference to
   something the page does not document still fails the build.
"""

from sphinx.util.nodes import make_refnode

_KEPT = "trlib_api_docstrings"
_PROSE = ("attribute", "data", "property")


def _keep_prose(app, what, name, obj, options, lines):
    if what in _PROSE:
        app.env.temp_data.setdefault(_KEPT, {})[name] = list(lines)


def _restore_prose(app, what, name, obj, options, lines):
    kept = app.env.temp_data.get(_KEPT, {}).pop(name, None)
    if kept is not None:
        lines[:] = kept


def _resolve_reexported(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip("~.")
    last = target.rsplit(".", 1)[-1]
    context = node.get("py:class")
    here = (node.get("py:module") or "").split(".")
    py = env.get_domain("py")
    types = set(py.objtypes_for_role(node.get("reftype")) or ())
    modules = set(py.modules)
    found = []
    for name, entry in py.objects.items():
        parent, _, leaf = name.rpartition(".")
        if leaf != last or not name.startswith("trlib.") or entry.objtype not in types:
            continue
        if parent in modules or (context and parent.endswith("." + context)):
            shared = 0
            for a, b in zip(here, parent.split(".")):
                if a != b:
                    break
                shared += 1
            found.append((-shared, len(name), name, entry))
    if not found:
        return None
    _, _, name, entry = min(found)
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name)


def setup(app):
    app.connect("autodoc-process-docstring", _keep_prose, priority=400)  # napoleon runs at 500
    app.connect("autodoc-process-docstring", _restore_prose, priority=600)
    app.connect("missing-reference", _resolve_reexported)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
