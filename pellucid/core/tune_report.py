"""The recipe search's written output: the Markdown table of a :func:`pellucid.core.tune.tune` result,
the winner as a TOML recipe, and the CPU line the table names."""
from __future__ import annotations

import json
import platform

__all__ = ["render_table"]


def _cpu_line() -> str:
    try:
        from pellucid.core.quantize import cpu_features

        return cpu_features().summary()
    except Exception:  # a description only; never fail a search over it
        return platform.processor() or platform.machine()


def _fmt(mean, sd, signed: bool = False) -> str:
    if mean is None:
        return "—"
    m = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return m + (f" ± {sd:.3f}" if sd is not None else "")


def render_table(result: dict) -> str:
    """The Markdown table of a :func:`tune` result."""
    p, s = result["metrics"][0], result["metrics"][1]
    lines = [f"# Recipe search: {result.get('name') or result['task']}", "",
             f"{result['k']}-fold grouped cross-validation of the dev data (`{result['data']}`, n = {result['n']}, "
             f"seed {result['seed']}); every candidate on the same folds, the test part of a fold only scores. "
             f"CPU: {result['cpu']}; torch {result['torch']}, {result['threads']} thread(s). "
             f"Search took {result['seconds']:.0f} s ({result['embed_seconds']:.0f} s computing frozen features)."
             + (" Rows kept from earlier searches (`--resume`) were scored there, on: "
                + "; ".join(result["earlier_cpus"]) + "." if result.get("earlier_cpus") else "")
             + (f" {result['unreadable']} of the {result['n']} files could not be read (the log names them) "
                "and count in no fold." if result.get("unreadable") else "")
             + (f" Class(es) {', '.join(result['blocked_classes'])} are one recording each: cut into "
                f"{2 * result['k']} blocks in frame order, each a group (weaker than group separation: "
                "frames at block edges look alike)." if result.get("blocked_classes") else ""), "",
             f"| candidate | {p} (mean ± sd) | {s} | Δ{p} vs A | Δ{p} vs B | s / fold | folds |"
             + (f" official split {p} |" if result["official_split"] else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if result["official_split"] else "")]
    for r in result["candidates"]:
        mark = " **(winner)**" if r["name"] == result["winner"] else ""
        role = f" [{r['role']}]" if r["role"] in ("A", "B") else ""
        vs = [(_fmt(r[f"vs_{x}"]["mean"], r[f"vs_{x}"]["sd"], True) if r.get(f"vs_{x}") and r["role"] != x else "—")
              for x in ("A", "B")]
        folds = f"{r['n_folds']}/{result['k']}" + ((" (budget)" if "budget" in r["stopped"] else " (subset)")
                                                   if r["stopped"] else "")
        sec = f"{r['fold_seconds']:.1f}" if r["fold_seconds"] is not None else "—"
        line = (f"| `{r['name']}`{role}{mark} | {_fmt(r['summary'][p]['mean'], r['summary'][p]['sd'])} | "
                f"{_fmt(r['summary'][s]['mean'], r['summary'][s]['sd'])} | {vs[0]} | {vs[1]} | {sec} | {folds} |")
        if result["official_split"]:
            off = r.get("official")
            line += f" {off['metrics'][p]:.3f} |" if off and off["metrics"].get(p) is not None else " — |"
        lines.append(line)
    lines += ["", "Candidates:", ""] + [f"- `{r['name']}`: {r['about']}" + (f" — stopped: {r['stopped']}"
                                                                          if r["stopped"] else "")
                                       for r in result["candidates"]]
    lines += ["", f"Winner: `{result['winner']}` — {result.get('rule', '')}." if result["winner"]
              else "No candidate ran on every fold."]
    return "\n".join(lines) + "\n"


def _recipe_toml(recipe: dict, name: str) -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if v is None:
            return '""'
        if isinstance(v, (list, tuple)):  # e.g. probe_layers: a TOML array
            return "[" + ", ".join(val(x) for x in v) + "]"
        return json.dumps(str(v))

    size = recipe.get("image_size")
    lines = [f"# winner of `pellucid tune`: {name}", f"image_size = {size}" if size else "", "", "[recipe]"]
    members = recipe.get("members") or []
    lines += [f"{k} = {val(v)}" for k, v in recipe.items() if k not in ("members", "image_size") and v is not None
              and not isinstance(v, (dict, list))]
    for m in members:
        lines += ["", "[[recipe.members]]"] + [f"{k} = {val(v)}" for k, v in m.items()]
    return "\n".join(lines) + "\n"
