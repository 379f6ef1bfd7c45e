"""The Dask dashboard of a local cluster: the link users see, and a Groups page that works.

distributed's Groups page (`/groups`, `/individual-groups`) lays task groups out in the
order `dask.order.order` gives them, but that function ignores the dependencies it is
passed when the graph's values are not tasks, so a group can come before the groups it
depends on and the page fails with a KeyError (HTTP 500 and a traceback in the log:
dask/distributed#5100, dask/dask#11451). `groups_page` swaps in a layout that places each
group after its dependencies (a cycle, which lanes can make, is broken before its first
group by name) while a local cluster runs, and restores the original.
"""

from __future__ import annotations

import contextlib


def local_link(link: str, dashboard_address: str) -> str:
    """The dashboard link with the host it listens on (dask names the machine's address)."""
    host = dashboard_address.rpartition(":")[0]
    if not host or host in ("0.0.0.0", "::", "[::]"):
        return link
    scheme, _, rest = link.partition("://")
    return f"{scheme}://{host}:{rest.partition(':')[2]}" if ":" in rest else link


def layered(dependencies: dict[str, set[str]]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(node positions {group: {x, y}}, arrows {group: {nstart, nend}}) of the Groups page:
    a group sits one column right of its rightmost dependency; groups without any start
    column 0, each on a new row; no two groups share a place."""
    xs: dict[str, int] = {}
    ys: dict[str, int] = {}
    taken: set[tuple[int, int]] = set()
    for group in _order(dependencies):
        placed = [d for d in dependencies[group] if d in xs]
        if placed:
            x, y = max(xs[d] for d in placed) + 1, max(ys[d] for d in placed)
            if len(placed) > 1 and len({ys[d] for d in placed}) == 1:
                y += 1
        else:
            x, y = 0, max(ys.values()) + 1 if ys else 0
        while (x, y) in taken:
            y += 1
        taken.add((x, y))
        xs[group], ys[group] = x, y
    nodes = {g: {"x": xs[g], "y": ys[g]} for g in xs}
    arrows = {g: {"nstart": set(dependencies[g]), "nend": [g] * len(dependencies[g])} for g in xs}
    return nodes, arrows


def _order(dependencies: dict[str, set[str]]) -> list[str]:
    """The groups with each after its dependencies, by name among ties. A cycle is broken
    before its first group by name (that group's dependency inside the cycle is dropped)."""
    from graphlib import CycleError, TopologicalSorter

    deps = {g: {d for d in ds if d in dependencies} for g, ds in dependencies.items()}
    while True:
        sorter = TopologicalSorter(deps)
        try:
            sorter.prepare()
        except CycleError as e:
            cycle = e.args[1][:-1]  # each node depends on the one before it; the last repeats the first
            first = cycle.index(min(cycle))
            deps[cycle[first]].discard(cycle[first - 1])
            continue
        order: list[str] = []
        while sorter.is_active():
            ready = sorted(sorter.get_ready())
            order += ready
            sorter.done(*ready)
        return order


def _update_layout(self):
    dependencies = {name: {d.name for d in group.dependencies if d.name != name}
                    for name, group in self.scheduler.task_groups.items()}
    return layered(dependencies)


@contextlib.contextmanager
def groups_page():
    """While inside, the dashboard's Groups page lays groups out with `layered`."""
    from distributed.dashboard.components.scheduler import TaskGroupGraph

    original = TaskGroupGraph.__dict__["update_layout"]
    TaskGroupGraph.update_layout = _update_layout
    try:
        yield
    finally:
        TaskGroupGraph.update_layout = original
