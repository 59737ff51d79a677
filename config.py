"""The one source of configuration: args.json -> optional --config FILE -> command line.

Every script of the kit builds its parser here from the keys of args.json whose group it uses,
so a flag is declared once (bench.py, which runs the kit's scripts, has its own few flags and
takes the kit's keys as recipe changes). Types come from the default values (lists take as many values as the
default has, or any number when the default is empty; booleans are --key / --no-key).
Unknown keys, on the command line or in a --config file, are errors that name the key and
suggest the closest one.
"""
import argparse
import difflib
import json
import os
import sys
from pathlib import Path

ARGS_FILE = Path(__file__).resolve().parent / "args.json"
SCRIPT_GROUPS = {
    "train": ("data", "loader", "model", "train", "common"),
    "inference": ("inference", "loader", "common"),
    "ensemble": ("ensemble",),
    "score": ("score",),
    "detect": ("detect",),
    "masks": ("masks",),
}


def load_spec(path=ARGS_FILE):
    with open(path) as f:
        return json.load(f)


def script_keys(script, spec):
    """The keys a script uses: those whose group (a name or a list of names) it reads."""
    groups = set(SCRIPT_GROUPS[script])
    return [k for k, e in spec.items() if groups & ({e["group"]} if isinstance(e["group"], str) else set(e["group"]))]


def default_config(script="train"):
    """The defaults of a script's keys (environment variables applied), as a plain dict."""
    spec = load_spec()
    return {key: _env_default(spec[key], script) for key in script_keys(script, spec)}


def _env_default(entry, script):
    """The key's environment variable when it is set (and, with env_scripts, only for those
    scripts), else its default."""
    if script not in entry.get("env_scripts", SCRIPT_GROUPS):
        return entry["default"]
    value = os.environ.get(entry.get("env", ""), "")
    return value if value else entry["default"]


ITEM_TYPES = {"str": str, "int": int, "float": float}


def item_type(entry):
    """The type of a list key's items: its first default item's, or 'item_type' for empty defaults."""
    return ITEM_TYPES[entry["item_type"]] if "item_type" in entry else type(entry["default"][0])


def _add_argument(parser, key, entry):
    default, flag = entry["default"], f"--{key}"
    # SUPPRESS keeps unset flags out of the namespace, so they cannot override a --config file.
    kwargs = {"help": f"{entry['help']} (default: {json.dumps(default)})", "default": argparse.SUPPRESS}
    if "choices" in entry:
        kwargs["choices"] = entry["choices"]
    if isinstance(default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif isinstance(default, list):
        nargs = len(default) if default else "*"
        parser.add_argument(flag, type=item_type(entry), nargs=nargs, metavar=key.upper(), **kwargs)
    else:
        parser.add_argument(flag, type=type(default), metavar=type(default).__name__.upper(), **kwargs)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse says "unrecognized arguments: --lrr 0.1"; add the closest known flag.
        if message.startswith("unrecognized arguments:"):
            flags = [a for a in message.split(":", 1)[1].split() if a.startswith("--")]
            hints = [suggest(f[2:].split("=")[0], self.known_keys) for f in flags]
            message += "".join(h for h in hints if h)
        super().error(message)


def suggest(key, known, flag="--"):
    """' (did you mean --x?)' for a mistyped key: the keys it begins (--ep: --epochs), else the
    closest spelling (--lrr: --lr); '' when none is near. flag: '' for keys written without it."""
    close = sorted(k for k in known if k.startswith(key)) or difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean {', '.join(flag + k for k in close)}?)" if close else ""


def build_parser(script, description=None):
    spec = load_spec()
    parser = _Parser(description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=argparse.SUPPRESS, action="append",
                        help="JSON file of key: value overrides, applied before the command line; given more "
                             "than once, the files apply in order (a later file wins)")
    keys = script_keys(script, spec)
    parser.known_keys = keys
    for key in keys:
        _add_argument(parser, key, spec[key])
    return parser


def check_value(key, value, entry, where):
    """A config-file value must have its default's type (an int is a float too) and be one of the choices."""
    default = entry["default"]

    def fits(v, kind):
        return isinstance(v, (int, float) if kind is float else kind) and (kind is bool or not isinstance(v, bool))

    ok = fits(value, type(default))
    if ok and isinstance(default, list):
        ok = all(fits(v, item_type(entry)) for v in value) and (not default or len(value) == len(default))
    if not ok:
        raise SystemExit(f"error: {where}: '{key}' should look like {json.dumps(default)}, got {value!r}")
    if "choices" in entry and value not in entry["choices"]:
        raise SystemExit(f"error: {where}: '{key}' is {value!r}, not one of {entry['choices']}")


def read_config_file(path, known_keys):
    """Read a flat JSON override file for a script whose keys are known_keys. One file may serve
    several scripts (a recipe with training keys and its `tta`), so keys of args.json that this
    script does not use are left out; keys not in args.json at all, and values of the wrong type
    or outside the choices, are errors naming the file and the key."""
    def no_repeats(pairs):  # json keeps the last of two equal keys; one of them would be ignored unseen
        repeated = sorted({key for i, (key, _) in enumerate(pairs) if key in dict(pairs[:i])})
        if repeated:
            raise SystemExit(f"error: config file {path}: key(s) {repeated} given twice")
        return dict(pairs)

    try:
        with open(path) as f:
            values = json.load(f, object_pairs_hook=no_repeats)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read config file {path}: {e}")
    if not isinstance(values, dict):
        raise SystemExit(f"error: config file {path} must hold a JSON object of key: value")
    spec = load_spec()
    for key, value in values.items():
        if key not in spec:
            raise SystemExit(f"error: unknown key '{key}' in config file {path}{suggest(key, list(spec))}")
        if isinstance(spec[key]["default"], str) and type(value) is int:  # "fold": 0, as --fold 0 reads
            values[key] = value = str(value)
        check_value(key, value, spec[key], f"config file {path}")
    return {key: value for key, value in values.items() if key in known_keys}


def parse_config(script, argv=None, description=None, with_given=False):
    """Resolve a script's configuration: args.json defaults, then --config FILE, then argv.
    with_given: also return the keys set by the file or the command line (even to their
    default value), for train.py --resume, which must refuse settings it would not use."""
    parser = build_parser(script, description)
    cli = vars(parser.parse_args(argv))
    cfg = default_config(script)
    given = set()
    for path in cli.pop("config", []):
        from_file = read_config_file(path, parser.known_keys)
        cfg.update(from_file)
        given |= set(from_file)
    cfg.update(cli)
    given |= set(cli)
    spec = load_spec()
    from_env = [] if cfg.get("resume") else [key for key in sorted(set(cfg) - given) if cfg[key] != spec[key]["default"]]
    for key in from_env:  # a value nobody typed is named, so an error about it can be traced (a resumed run keeps its own)
        print(f"--{key} {cfg[key]} from the environment variable {spec[key]['env']}", file=sys.stderr)
    return (cfg, given) if with_given else cfg
