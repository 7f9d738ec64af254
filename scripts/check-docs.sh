#!/usr/bin/env bash
# `make test` (right after the relay is built): the documentation matches the code.
#   - docs/configuration.md names every setting the relay accepts, and nothing else: the long flags
#     of every subcommand (`pg-outbox-relay <sub> --help`), their environment variables and the
#     defaults the help shows, and the keys of the config file (each flag's name with `_` for `-`,
#     asked of the relay's own loader: a key it does not know is "unknown setting"). Compared both
#     ways: a setting missing from the reference fails, and so does a documented one the relay
#     does not accept.
#   - every relative link in README.md, docs/*.md and BENCHMARKS.md points to a file that exists,
#     and a `#fragment` to a heading of that file (GitHub's anchors).
#
#   scripts/check-docs.sh [RELAY_BIN]     default ${CARGO_TARGET_DIR:-target}/debug/pg-outbox-relay
#   CHECK_DOCS_REFERENCE=path             the reference to check (default docs/configuration.md)
set -euo pipefail
cd "$(dirname "$0")/.."
relay=${1:-${CARGO_TARGET_DIR:-target}/debug/pg-outbox-relay}
[ -x "$relay" ] || { echo "check-docs: no relay binary at $relay (build it first)" >&2; exit 1; }
reference=${CHECK_DOCS_REFERENCE:-docs/configuration.md}

RELAY="$relay" REFERENCE="$reference" python3 - <<'PY'
import os, re, subprocess, sys, tempfile

relay, reference = os.environ["RELAY"], os.environ["REFERENCE"]
problems = []
SUBCOMMANDS = ["run", "check", "status", "ingest", "healthcheck"]
# flags every command has, which are no setting
GENERIC = {"--help", "--version"}

# --- what the relay accepts, from its help ---------------------------------------------------------
def helptext(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG_OUTBOX_")}
    env["COLUMNS"] = "1000"
    out = subprocess.run([relay, *args, "--help"], capture_output=True, text=True, env=env, timeout=30)
    if out.returncode != 0:
        sys.exit(f"check-docs: {relay} {' '.join(args)} --help failed: {out.stderr.strip()}")
    return out.stdout

top = helptext()
listed = re.findall(r"(?m)^  (\w+)\s{2,}", top.split("Commands:")[1].split("\n\n")[0])
listed = [c for c in listed if c != "help"]
if sorted(listed) != sorted(SUBCOMMANDS):
    problems.append(f"the relay's subcommands are {listed}, this checker knows {SUBCOMMANDS}: update it")

accepted = {}  # flag -> {"env": set, "defaults": {sub: text}, "subs": set}
for sub in listed:
    blocks, cur = [], None
    for line in helptext(sub).splitlines():
        m = re.match(r"^\s+(?:-\w, )?(--[a-z0-9-]+)(.*)$", line)
        if m:
            cur = [m.group(1), m.group(2)]
            blocks.append(cur)
        elif cur is not None and line.startswith("   ") and line.strip():
            cur[1] += " " + line.strip()
        else:
            cur = None
    for flag, text in blocks:
        if flag in GENERIC:
            continue
        a = accepted.setdefault(flag, {"env": set(), "defaults": {}, "subs": set()})
        a["subs"].add(sub)
        a["env"].update(re.findall(r"\[env: ([A-Z0-9_]+)", text))
        d = re.search(r"\[default: ([^\]]*)\]", text)
        if d:
            a["defaults"][sub] = d.group(1).strip()

def key_known(key):
    """Asks the relay's config loader whether `key` is a key of its file."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(f"{key} = [[]]\n")  # a wrong type for every setting: the loader stops at once
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG_OUTBOX_")}
        out = subprocess.run([relay, "status", "--config", f.name], capture_output=True, text=True,
                             env=env, timeout=30)
    finally:
        os.unlink(f.name)
    said = out.stderr + out.stdout
    if out.returncode != 2 or "config file" not in said:
        sys.exit(f"check-docs: probing the file key {key!r} gave exit {out.returncode}: {said.strip()}")
    return f"unknown setting `{key}`" not in said

# --- what the reference documents ------------------------------------------------------------------
def cells(row):
    parts, cur, tick = [], "", False
    i = 0
    while i < len(row):
        c = row[i]
        if c == "\\" and i + 1 < len(row):
            cur += row[i:i + 2]; i += 2; continue
        if c == "`":
            tick = not tick
        if c == "|" and not tick:
            parts.append(cur.strip()); cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur.strip())
    return parts[1:-1]

documented = {}  # flag -> {"key": str|None, "env": set, "default": str, "line": int}
header = None
with open(reference) as f:
    for n, line in enumerate(f, 1):
        if not line.startswith("|"):
            header = None
            continue
        row = cells(line.rstrip("\n"))
        if header is None:
            header = [c.lower() for c in row]
            continue
        if set("".join(row)) <= set("-: "):
            continue
        if header[:4] != ["file key", "flag", "environment", "default"]:
            continue
        key, flag, env, default = row[:4]
        m = re.match(r"^`(--[a-z0-9-]+)", flag)
        if not m:
            problems.append(f"{reference}:{n}: the flag column {flag!r} does not start with a `--flag`")
            continue
        flag = m.group(1)
        if flag in documented:
            problems.append(f"{reference}:{n}: {flag} is documented twice")
        k = re.match(r"^`\[?([a-z0-9_]+)\]?`", key)
        documented[flag] = {
            "key": k.group(1) if k else None,
            "env": {e for e in re.findall(r"`([A-Z0-9_<>]+)`", env) if "<" not in e},
            "default": default.replace("`", ""),
            "line": n,
        }

if not documented:
    problems.append(f"{reference}: no reference table (columns: file key | flag | environment | default | meaning)")

# --- compared both ways ----------------------------------------------------------------------------
for flag in sorted(set(accepted) - set(documented)):
    subs = ", ".join(sorted(accepted[flag]["subs"]))
    problems.append(f"{flag} (accepted by {subs}) is not documented in {reference}")
for flag in sorted(set(documented) - set(accepted)):
    problems.append(f"{reference}:{documented[flag]['line']}: {flag} is documented but no subcommand accepts it")
for flag in sorted(set(accepted) & set(documented)):
    a, d = accepted[flag], documented[flag]
    where = f"{reference}:{d['line']}"
    for e in sorted(a["env"] - d["env"]):
        problems.append(f"{where}: {flag} reads {e}, which the reference does not name")
    for e in sorted(d["env"] - a["env"]):
        problems.append(f"{where}: the reference names {e} for {flag}, which the relay does not read")
    for default in sorted(set(a["defaults"].values())):
        if default not in d["default"]:
            subs = ", ".join(s for s, v in sorted(a["defaults"].items()) if v == default)
            problems.append(f"{where}: {flag} defaults to {default!r} ({subs} --help), the reference says {d['default']!r}")

# file keys: the loader knows a key for a flag iff the reference gives it that key
for flag in sorted(accepted):
    name = flag[2:].replace("-", "_")
    known = key_known(name)
    d = documented.get(flag)
    if d is None:
        continue
    if known and d["key"] != name:
        problems.append(f"{reference}:{d['line']}: the config file takes `{name}` ({flag}), the reference gives {d['key']!r}")
    if not known and d["key"] not in (None, "kafka"):
        problems.append(f"{reference}:{d['line']}: the reference gives the file key `{d['key']}`, which the config file does not take")
for flag, d in sorted(documented.items()):
    if d["key"] and d["key"] != flag[2:].replace("-", "_") and d["key"] != "kafka" and not key_known(d["key"]):
        problems.append(f"{reference}:{d['line']}: the config file does not take `{d['key']}`")
if "--kafka" in documented and documented["--kafka"]["key"] != "kafka":
    problems.append(f"{reference}: --kafka's file form is the [kafka] table")

# --- relative links --------------------------------------------------------------------------------
def anchors(path):
    out, seen = set(), {}
    fence = False
    for line in open(path):
        if line.startswith("```"):
            fence = not fence
        if fence:
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out

pages = ["README.md", "BENCHMARKS.md"] + sorted(
    os.path.join("docs", p) for p in os.listdir("docs") if p.endswith(".md"))
for page in pages:
    base = os.path.dirname(page)
    text = open(page).read()
    text = re.sub(r"(?ms)^```.*?^```", "", text)       # code blocks
    text = re.sub(r"`[^`\n]*`", "", text)              # inline code
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"^[a-z]+:", target):
            continue                                   # http:, https:, mailto:
        path, _, frag = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else page
        if not os.path.exists(full):
            problems.append(f"{page}: link to {target}: {full} does not exist")
            continue
        if frag and full.endswith(".md") and frag not in anchors(full):
            problems.append(f"{page}: link to {target}: {full} has no heading #{frag}")

if problems:
    print("check-docs: the documentation does not match the code:", file=sys.stderr)
    for p in problems:
        print("  " + p, file=sys.stderr)
    sys.exit(1)
print(f"check-docs: {len(accepted)} flags of {len(listed)} subcommands documented in {reference}, "
      f"every relative link of {len(pages)} pages resolves")
PY
