"""What the config parity tests share: a resolved config as flat ``{'a.b[0].c': value}``."""
from __future__ import annotations


def flatten(node, prefix=''):
    """Every leaf of a resolved config as ``{'a.b[0].c': value}``; the ``_scope_`` markers that
    inheriting through ``mmdet::`` / ``mmseg::`` stamps on typed dicts are returned apart."""
    leaves, scopes = {}, {}
    if isinstance(node, dict):
        if not node and prefix:
            leaves[prefix] = {}
        for key, value in node.items():
            path = f'{prefix}.{key}' if prefix else key
            if key == '_scope_':
                scopes[path] = value
                continue
            sub, sub_scopes = flatten(value, path)
            leaves.update(sub)
            scopes.update(sub_scopes)
    elif isinstance(node, (list, tuple)):
        if not node:
            leaves[prefix] = type(node)()
        for i, value in enumerate(node):
            sub, sub_scopes = flatten(value, f'{prefix}[{i}]')
            leaves.update(sub)
            scopes.update(sub_scopes)
    else:
        leaves[prefix] = node
    return leaves, scopes
