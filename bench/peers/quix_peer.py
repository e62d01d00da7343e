#!/usr/bin/env python3
"""contextd's semantics as a Quix Streams application: the peer of the benchmarks.

It consumes the three input topics and `context.settings`, and does what
contextd does (CONTRACT.md), written the way a Quix Streams user would:

    each input topic ──► validate ──► peer.validated (one key) ──► resolve (stateful: identity
        table, known users, settings) ──► peer.records (key: user id) ──► materialize (stateful,
        RocksDB, per user: timeline deduplicated by id and capped at 1000, profiles put/patch/
        delete, visibility) ──► output topic: JSON snapshot (newest 50 shown events + shown
        profiles, version + 1) whenever what the user's context shows changes
    dead letters (invalid_json, missing_field, invalid_field, reserved_source, too_large,
        unresolvable_user, not_found) travel with the records and go to the DLQ topic in
        contextd's format

Why it is shaped like this:
* Quix state is scoped by message key. Resolving a user needs the whole
  identity table (an identifier may be linked by any earlier record), so the
  resolve step runs under one constant key: one partition of `peer.validated`
  holds the table, like a global table in Kafka Streams.
* Each input topic has its own dataframe writing to `peer.validated` rather
  than one `concat` of the four: concat turns on Quix's cross-topic time
  alignment, which pauses and resumes partitions and, measured on tansu, left
  the app waiting on fetches (3.4x slower). Without it, as in any Kafka
  consumer, there is no order across topics; the harness loads the settings
  before the inputs (`--ready-file`), as contextd routes them first.
* Quix allows one group_by per chain and none across dataframes, so both
  re-keys use explicit topics (`peer.validated`, and `peer.records`, which is
  contextd's records log).
* No branches: Quix copies (pickles) a value for every branch, so dead
  letters travel with the records and each output goes to a topic chosen per
  value.
* A state store cannot be iterated through the public API, so the resolve step
  also keeps the list of known users; a settings change is fanned out to every
  known user (one message each), and a new user's first record carries the
  settings in force. Each user's state holds the settings it last received, so
  the per-user step never needs a global lookup.
* Per user: events one key each, stored as their JSON (`set_bytes`), a
  columnar timeline index, and the last snapshot's events as bytes, so a record
  costs a few small state reads and writes and the snapshot is spliced, not
  re-encoded.
* One snapshot per record that changes what the user's context shows (Quix
  processes record by record; contextd may coalesce a burst into one).
* Quix defaults otherwise: at-least-once, RocksDB state with changelog topics
  (unless --no-changelog), orjson; producers use lz4 and a 5 ms linger.

It stops by itself after --idle-exit seconds without a message (once it has
seen one) and prints one JSON line: records processed, wall seconds from the
first input record to the last message processed, records/s, snapshots, and
`t_start`/`t_end` (Unix seconds) for the harness's CPU accounting.
"""

import argparse
import base64
import bisect
import calendar
import hashlib
import os
import re
import sys
import tempfile
import threading
import time

import orjson
from quixstreams import Application, message_context
from quixstreams.models import TopicConfig

MAX_RECORD_BYTES = 1024 * 1024
ZENDESK = "zendesk"
PRIORITY = {"external_id": 0, "email": 1, "phone_number": 2}


# ---------------------------------------------------------------- validation


class Rejection(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _kind(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def missing(path):
    return Rejection("missing_field", f"{path} is required")


def invalid(path, why):
    return Rejection("invalid_field", f"{path} {why}")


def parse_object(raw):
    if raw is None:
        raw = b""
    if len(raw) > MAX_RECORD_BYTES:
        raise Rejection("too_large", f"record is {len(raw)} bytes, larger than the maximum of {MAX_RECORD_BYTES} bytes")
    try:
        v = orjson.loads(raw)  # rejects invalid UTF-8 too
    except orjson.JSONDecodeError as e:
        raise Rejection("invalid_json", f"record is not valid JSON: {e}")
    if not isinstance(v, dict):
        raise Rejection("invalid_json", f"record must be a JSON object, got {_kind(v)}")
    return v


def req_str(o, key, path):
    v = o.get(key)
    if v is None or v == "":
        raise missing(path)
    if not isinstance(v, str):
        raise invalid(path, f"must be a string, got {_kind(v)}")
    return v


def opt_str(o, key, path):
    v = o.get(key)
    if v is None or isinstance(v, str):
        return v
    raise invalid(path, f"must be a string, got {_kind(v)}")


def req_obj(o, key, path):
    v = o.get(key)
    if v is None:
        raise missing(path)
    if not isinstance(v, dict):
        raise invalid(path, f"must be an object, got {_kind(v)}")
    return v


def opt_obj(o, key, path):
    v = o.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise invalid(path, f"must be an object, got {_kind(v)}")
    return v


def user_id_of(o, required):
    v = o.get("user_id")
    if v is None:
        if required:
            raise missing("user_id")
        return None
    if isinstance(v, str):
        v = v.strip()
        if not v:
            raise missing("user_id")
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise invalid("user_id", f"must be a string or an integer, got {_kind(v)}")


def type_name(o, key, path):
    s = req_str(o, key, path)
    if len(s) > 40:
        raise invalid(path, "is longer than 40 characters")
    if ":" in s:
        raise invalid(path, "must not contain ':'")
    return s


_RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|z|[+-]\d{2}:\d{2})$")


def parse_rfc3339(s):
    m = _RFC3339.match(s.strip())
    if not m:
        return None
    y, mo, d, h, mi, sec, frac, off = m.groups()
    try:
        secs = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(sec), 0, 0, 0))
        if not (1 <= int(mo) <= 12 and 1 <= int(d) <= 31 and int(h) < 24 and int(mi) < 60 and int(sec) < 61):
            return None
    except (ValueError, OverflowError):
        return None
    ns = int((frac or "")[:9].ljust(9, "0")) if frac else 0
    if off not in ("Z", "z"):
        sign = 1 if off[0] == "+" else -1
        secs -= sign * (int(off[1:3]) * 3600 + int(off[4:6]) * 60)
    return secs * 1_000_000_000 + ns


def format_rfc3339(ns):
    """UTC, with 0, 3, 6 or 9 fraction digits as needed (like chrono's AutoSi)."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    if frac == 0:
        return base + "Z"
    if frac % 1_000_000 == 0:
        return f"{base}.{frac // 1_000_000:03d}Z"
    if frac % 1_000 == 0:
        return f"{base}.{frac // 1_000:06d}Z"
    return f"{base}.{frac:09d}Z"


def timestamp(o, key, path, default):
    v = o.get(key)
    if v is None:
        return default
    if isinstance(v, str):
        ns = parse_rfc3339(v)
        if ns is None:
            raise invalid(path, f"is not an RFC 3339 timestamp: {v!r}")
        return ns
    raise invalid(path, f"must be an RFC 3339 timestamp string, got {_kind(v)}")


def norm_identifier(t, v):
    t = t.strip().lower()
    if t in ("email", "twitter"):
        v = v.strip().lower()
    return t, v


def identifiers(o, key, path):
    items = o.get(key)
    if items is None:
        return []
    if not isinstance(items, list):
        raise invalid(path, f"must be an array, got {_kind(items)}")
    out, seen = [], set()
    for i, item in enumerate(items):
        p = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise invalid(p, f"must be an object, got {_kind(item)}")
        t, v = norm_identifier(req_str(item, "type", p + ".type"), req_str(item, "value", p + ".value"))
        if not t:
            raise missing(p + ".type")
        if not v:
            raise missing(p + ".value")
        if (t, v) not in seen:
            seen.add((t, v))
            out.append([t, v])
    out.sort(key=lambda x: PRIORITY.get(x[0], 3))  # stable: others keep their order
    return out


def event_id(o, path):
    v = o.get("id")
    if v is None or v == "":
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise invalid(path, f"must be a string, got {_kind(v)}")


def build_event(o, path, source, kind, log_ns):
    description = opt_str(o, "description", path + ".description") or ""
    created = timestamp(o, "created_at", path + ".created_at", log_ns)
    props = opt_obj(o, "properties", path + ".properties")
    eid = event_id(o, path + ".id")
    if eid is None:
        canonical = orjson.dumps([source, kind, description, created, props], option=orjson.OPT_SORT_KEYS)
        eid = hashlib.sha256(canonical).hexdigest()[:32]
    ev = {"id": eid, "source": source, "type": kind, "description": description, "properties": props,
          "created_at": format_rfc3339(created), "received_at": format_rfc3339(log_ns)}
    return ev, created


def unresolvable():
    return Rejection("unresolvable_user", "the record has no user_id and no identifier to resolve the user from; add user_id or profile.identifiers")


def profile_ref(o):
    p = req_obj(o, "profile", "profile")
    source = type_name(p, "source", "profile.source")
    kind = type_name(p, "type", "profile.type")
    if source == ZENDESK:
        raise Rejection("reserved_source", 'profile.source "zendesk" is reserved for Zendesk product events')
    return p, {"source": source, "type": kind, "name": opt_str(p, "name", "profile.name"),
               "ids": identifiers(p, "identifiers", "profile.identifiers")}


def zendesk_event(o, log_ns):
    uid = user_id_of(o, True)
    kind = type_name(o, "type", "type")
    src = opt_str(o, "source", "source")
    if src is not None and src != ZENDESK:
        raise invalid("source", f'of a Zendesk event must be "zendesk", got {src!r}')
    ev, created = build_event(o, "event", ZENDESK, kind, log_ns)
    links = []
    value_key = "value" if kind == "identity_created" else "current_value" if kind == "identity_changed" else None
    props = o.get("properties")
    if value_key and isinstance(props, dict):
        t = opt_str(props, "identity_type", "properties.identity_type")
        v = opt_str(props, value_key, "properties." + value_key)
        if t is not None and v is not None:
            t, v = norm_identifier(t, v)
            if t and v:
                links.append([t, v])
    return {"t": "z", "uid": uid, "ids": links, "ev": ev, "c": created}


def custom_event(o, log_ns):
    uid = user_id_of(o, False)
    e = req_obj(o, "event", "event")
    source = type_name(e, "source", "event.source")
    kind = type_name(e, "type", "event.type")
    if source == ZENDESK:
        raise Rejection("reserved_source", 'event.source "zendesk" is reserved for Zendesk product events')
    _, prof = profile_ref(o)
    ev, created = build_event(e, "event", source, kind, log_ns)
    if uid is None and not prof["ids"]:
        raise unresolvable()
    return {"t": "c", "uid": uid, "ids": prof["ids"], "prof": prof, "ev": ev, "c": created}


def profile_op(o):
    op = req_str(o, "op", "op")
    if op not in ("put", "patch", "delete"):
        raise invalid("op", f'must be "put", "patch" or "delete", got {op!r}')
    uid = user_id_of(o, False)
    p, prof = profile_ref(o)
    rec = {"t": "p", "op": op, "uid": uid, "ids": prof["ids"], "source": prof["source"], "type": prof["type"]}
    if op == "put":
        rec["name"] = prof["name"]
        rec["attributes"] = opt_obj(p, "attributes", "profile.attributes")
    elif op == "patch":
        patch = {}
        if "name" in p:
            if p["name"] is not None and not isinstance(p["name"], str):
                raise invalid("profile.name", "must be a string or null")
            patch["name"] = p["name"]
        if "attributes" in p:
            if p["attributes"] is not None and not isinstance(p["attributes"], dict):
                raise invalid("profile.attributes", f"must be an object, got {_kind(p['attributes'])}")
            patch["attributes"] = p["attributes"]
        rec["patch"] = patch
    if uid is None and not rec["ids"]:
        raise unresolvable()
    return rec


def settings_record(o):
    def flag(key):
        v = o.get(key)
        if v is None:
            return False
        if isinstance(v, bool):
            return v
        raise invalid(key, f"must be a boolean, got {_kind(v)}")

    def types(key):
        items = o.get(key)
        if items is None:
            return []
        if not isinstance(items, list):
            raise invalid(key, f"must be an array, got {_kind(items)}")
        out = set()
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise invalid(f"{key}[{i}]", "must be an object with source and type")
            out.add((req_str(item, "source", f"{key}[{i}].source"), req_str(item, "type", f"{key}[{i}].type")))
        return sorted([list(t) for t in out])

    s = {"z": flag("zendesk_events"), "e": flag("events_api"), "p": flag("profiles_api"),
         "ev": types("shown_event_types"), "pt": types("shown_profile_types")}
    s["sid"] = hashlib.sha1(orjson.dumps(s)).hexdigest()[:16]
    return s


# ------------------------------------------------------------- visibility


_compiled = {}


def compiled(s):
    """(event_shown(source, type), profile_shown(key)) for settings `s` (None = nothing shown)."""
    if s is None:
        return (lambda src, ty: False), (lambda key: False)
    c = _compiled.get(s["sid"])
    if c is None:
        z, e, p = s["z"], s["e"], s["p"]
        ev = {(a, b) for a, b in s["ev"]}
        pt = {f"{a}\t{b}" for a, b in s["pt"]}
        c = ((lambda src, ty: (z if src == ZENDESK else e) and (src, ty) in ev), (lambda key: p and key in pt))
        _compiled[s["sid"]] = c
    return c


# ----------------------------------------------------------------- peer


class Counters:
    def __init__(self):
        self.inputs = 0
        self.settings = 0
        # Input records processed before the first settings record: until
        # it arrives nothing is shown, so those records publish no
        # snapshots (Kafka orders nothing across topics).
        self.inputs_before_settings = None
        self.snapshots = 0
        self.snapshot_bytes = 0
        self.dead_letters = 0
        self.conflicts = 0
        self.first = None
        self.last = None


COUNTERS = Counters()


def dead_letter(code, message, topic, partition, offset, ts_ms, key, payload):
    """A dead letter in contextd's format (CONTRACT §6); records never have an "error" key."""
    COUNTERS.dead_letters += 1
    return {"error": {"code": code, "message": message}, "topic": topic, "partition": partition,
            "offset": offset, "timestamp": format_rfc3339(ts_ms * 1_000_000),
            "key_base64": base64.b64encode(key).decode() if key is not None else None,
            "payload_base64": base64.b64encode(payload or b"").decode()}


def validate_record(kind, topic, partition, offset, ts, key, value):
    """One input record -> a normalized record dict, or a dead letter."""
    log_ns = ts * 1_000_000
    try:
        o = parse_object(value)
        if kind == "z":
            rec = zendesk_event(o, log_ns)
        elif kind == "c":
            rec = custom_event(o, log_ns)
        elif kind == "p":
            rec = profile_op(o)
            if rec["op"] != "put":  # kept to dead-letter a not_found later
                rec["src"] = [topic, partition, offset, ts,
                              base64.b64encode(key).decode() if key is not None else None,
                              base64.b64encode(value).decode()]
        else:
            if key is not None and key != b"visibility":
                raise Rejection("invalid_field", f'{topic} records must have the key "visibility"')
            rec = {"t": "s", "s": settings_record(o)}
    except Rejection as r:
        return dead_letter(r.code, r.message, topic, partition, offset, ts, key, value)
    rec["ts"] = ts
    return rec


def _src_dead_letter(src, message):
    return dead_letter("not_found", message, src[0], src[1], src[2], src[3],
                       base64.b64decode(src[4]) if src[4] is not None else None, base64.b64decode(src[5]))


def resolve(rec, state):
    """Resolves the user of a record (CONTRACT §3.4) under the one identity key."""
    if "error" in rec:  # dead letters of the validate step pass through
        return [rec]
    t = rec["t"]
    if t == "s":
        s = rec["s"]
        state.set("settings", s)
        n = state.get("n", 0)
        return [{"u": state.get(f"ul:{i}"), "t": "set", "s": s, "ts": rec["ts"]} for i in range(n)]
    ids = rec["ids"]
    keys = [f"{a}:{b}" for a, b in ids]
    existing = [state.get("i:" + k) for k in keys]
    uid = rec["uid"]
    creating = not (t == "p" and rec["op"] != "put")
    if uid is None:
        uid = next((u for u in existing if u is not None), None)
        if uid is None:
            if not creating:
                return [_src_dead_letter(rec["src"], "no user has any of the profile's identifiers; nothing to patch or delete")]
            uid = keys[0]
    if not (t == "p" and rec["op"] == "delete"):
        for k, e in zip(keys, existing):
            if e is None:
                state.set("i:" + k, uid)
            elif e != uid:
                COUNTERS.conflicts += 1
    rec["u"] = uid
    if state.get("u:" + uid) is None:
        n = state.get("n", 0)
        state.set(f"ul:{n}", uid)
        state.set("n", n + 1)
        state.set("u:" + uid, 1)
        rec["s"] = state.get("settings")
    return [rec]


class Materializer:
    """Applies a user's records to the user's state and builds the snapshot."""

    def __init__(self, max_events, shown_max):
        self.max_events = max_events
        self.shown_max = shown_max

    def __call__(self, rec, state):
        uid = self.uid = rec["u"]  # the key of what this call returns
        at = rec["ts"] * 1_000_000
        m = state.get("m")
        if m is None:
            # v: version, s: settings, p: profiles; the timeline index is columnar (cheap to
            # decode): tc created_ns, ti id, tk type code into ty [[source, type], ...], sorted
            # by (created_ns, id); w: ids of the events in the last snapshot, sp: its profiles
            m = {"v": 0, "s": None, "p": {}, "tc": [], "ti": [], "tk": [], "ty": [], "at": 0, "w": None, "sp": None}
        if "s" in rec:
            m["s"] = rec["s"]
        t = rec["t"]
        profiles = m["p"]
        tc, ti, tk, ty = m["tc"], m["ti"], m["tk"], m["ty"]
        if t in ("z", "c"):
            if t == "c":
                ensure_profile(profiles, rec["prof"], at)
            ev = rec["ev"]
            eid, c = ev["id"], rec["c"]
            ekey = "e:" + eid
            if not state.exists(ekey):
                # Events are stored as their JSON, ready to be spliced into snapshots.
                state.set_bytes(ekey, orjson.dumps(ev))
                st = [ev["source"], ev["type"]]
                try:
                    code = ty.index(st)
                except ValueError:
                    code = len(ty)
                    ty.append(st)
                if not tc or (c, eid) > (tc[-1], ti[-1]):
                    pos = len(tc)
                else:
                    lo, hi = bisect.bisect_left(tc, c), bisect.bisect_right(tc, c)
                    pos = lo + bisect.bisect_left(ti[lo:hi], eid)
                tc.insert(pos, c)
                ti.insert(pos, eid)
                tk.insert(pos, code)
                excess = len(tc) - self.max_events
                if excess > 0:
                    for old in ti[:excess]:
                        state.delete("e:" + old)
                    del tc[:excess], ti[:excess], tk[:excess]
        elif t == "p":
            err = apply_profile_op(profiles, rec, at)
            if err:
                state.set("m", m)
                return _src_dead_letter(rec["src"], err)
        if t != "set":
            m["at"] = at
        # the visible content
        event_shown, profile_shown = compiled(m["s"])
        shown = [event_shown(a, b) for a, b in ty]
        window = []
        for j in range(len(ti) - 1, -1, -1):
            if shown[tk[j]]:
                window.append(ti[j])
                if len(window) == self.shown_max:
                    break
        shown_profiles = [render_profile(profiles[k]) for k in sorted(profiles) if profile_shown(k)]
        if m["w"] == window and m["sp"] == shown_profiles:
            state.set("m", m)
            return None
        # The last snapshot's events, as JSON, separated by RS (never found inside JSON text).
        last = state.get_bytes("snap")
        cached = dict(zip(m["w"], last.split(b"\x1e"))) if last and m["w"] else {}
        events = [cached.get(i) or state.get_bytes("e:" + i) for i in window]
        m["v"] += 1
        m["w"], m["sp"] = window, shown_profiles
        state.set("m", m)
        state.set_bytes("snap", b"\x1e".join(events))
        body = b"".join((b'{"user_id":', orjson.dumps(uid), b',"version":', str(m["v"]).encode(),
                         b',"updated_at":"', format_rfc3339(m["at"]).encode(), b'","profiles":', orjson.dumps(shown_profiles),
                         b',"events":[', b",".join(events), b"]}"))
        COUNTERS.snapshots += 1
        COUNTERS.snapshot_bytes += len(body)
        return body


def build(args):
    counters = COUNTERS
    input_topics = {args.zendesk_topic: "z", args.events_topic: "c", args.profiles_topic: "p", args.settings_topic: "s"}
    counted = {args.zendesk_topic, args.events_topic, args.profiles_topic}

    def processed(topic, partition, offset):
        now = time.time()
        if topic in counted:
            counters.inputs += 1
            if counters.first is None:
                counters.first = now
        elif topic == args.settings_topic:
            if counters.settings == 0:
                counters.inputs_before_settings = counters.inputs
                if args.ready_file:
                    # The harness loads the inputs once this exists.
                    with open(args.ready_file, "w") as f:
                        f.write("settings processed\n")
            counters.settings += 1
        counters.last = now

    app = Application(
        broker_address=args.brokers,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=args.state_dir,
        use_changelog_topics=not args.no_changelog,
        consumer_extra_config={"session.timeout.ms": 6000, "max.poll.interval.ms": 10000, "fetch.wait.max.ms": 10},
        producer_extra_config={"compression.type": "lz4", "linger.ms": 5},
        on_message_processed=processed,
        loglevel=args.loglevel,
    )
    # Explicit retention: brokers that only return the configs a topic was created
    # with (tansu) would otherwise leave Quix without retention.ms for its internal topics.
    tc = TopicConfig(num_partitions=args.partitions, replication_factor=1,
                     extra_config={"retention.ms": "-1", "retention.bytes": "-1"})
    sdfs = [app.dataframe(app.topic(t, value_deserializer="bytes", key_deserializer="bytes", config=tc)) for t in input_topics]
    dlq = app.topic(args.dlq_topic, key_serializer="bytes", value_serializer="json", config=tc)
    out = app.topic(args.output_topic, key_serializer="str", value_serializer="bytes", config=tc)
    validated = app.topic(args.validated_topic, key_serializer="str", key_deserializer="str",
                          value_serializer="json", value_deserializer="json", config=tc)
    records = app.topic(args.records_topic, key_serializer="str", key_deserializer="str",
                        value_serializer="json", value_deserializer="json", config=tc)

    # 1. validate (stateless), each input topic on its own: no concat, so no
    # cross-topic time alignment, which pauses and resumes partitions and leaves
    # the consumer waiting. Valid records and dead letters alike go, under one key,
    # to a topic that the resolve step reads (what group_by would do with a
    # repartition topic; Quix allows no group_by across separate dataframes).
    def validate(value, key, ts, headers):
        ctx = message_context()
        return validate_record(input_topics.get(ctx.topic), ctx.topic, ctx.partition, ctx.offset, ts, key, value)

    for sdf in sdfs:
        sdf.apply(validate, metadata=True).to_topic(validated, key=lambda v: "identity")

    # 2. resolve the user (stateful, one key: the identity table); dead letters pass through
    sdf = app.dataframe(validated).apply(resolve, stateful=True, expand=True)
    # The re-key by user goes through an explicit records topic (contextd's
    # records log), read by a second dataframe; no branches (Quix copies a value
    # for every branch): each output goes to a topic chosen per value.
    sdf.to_topic(lambda v, k, ts, h: dlq if "error" in v else records,
                 key=lambda v: _dlq_key(v) if "error" in v else v["u"])

    # 3. materialize per user (stateful, keyed by user id)
    materialize = Materializer(args.max_events, args.snapshot_events)
    users = app.dataframe(records)
    users = users.apply(materialize, stateful=True)
    users = users.filter(lambda v: v is not None)
    users.to_topic(lambda v, k, ts, h: out if isinstance(v, bytes) else dlq,
                   key=lambda v: materialize.uid if isinstance(v, bytes) else _dlq_key(v))
    return app, counters


def _dlq_key(v):
    k = v["key_base64"]
    return base64.b64decode(k) if k is not None else None


def render_ids(ids):
    return [{"type": a, "value": b} for a, b in ids]


def render_profile(p):
    return {"source": p["source"], "type": p["type"], "name": p["name"], "identifiers": render_ids(p["ids"]),
            "attributes": p["attributes"], "created_at": format_rfc3339(p["c"]), "updated_at": format_rfc3339(p["u"])}


def add_ids(into, ids):
    changed = False
    for i in ids:
        if i not in into:
            into.append(i)
            changed = True
    return changed


def ensure_profile(profiles, prof, at):
    key = f"{prof['source']}\t{prof['type']}"
    p = profiles.get(key)
    if p is None:
        profiles[key] = {"source": prof["source"], "type": prof["type"], "name": prof["name"], "ids": list(prof["ids"]),
                         "attributes": {}, "c": at, "u": at}
    elif add_ids(p["ids"], prof["ids"]):
        p["u"] = at


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict):
            t = target.get(k)
            if not isinstance(t, dict):
                t = {}
                target[k] = t
            merge_patch(t, v)
        else:
            target[k] = v


def apply_profile_op(profiles, rec, at):
    key = f"{rec['source']}\t{rec['type']}"
    p = profiles.get(key)
    op = rec["op"]
    if op == "put":
        profiles[key] = {"source": rec["source"], "type": rec["type"], "name": rec["name"], "ids": rec["ids"],
                         "attributes": rec["attributes"], "c": p["c"] if p else at, "u": at}
        return None
    if p is None:
        return f"cannot {op} profile ({rec['source']}, {rec['type']}): the user has no such profile"
    if op == "patch":
        patch = rec["patch"]
        if "name" in patch:
            p["name"] = patch["name"]
        if "attributes" in patch:
            if isinstance(patch["attributes"], dict):
                merge_patch(p["attributes"], patch["attributes"])
            else:
                p["attributes"] = {}
        add_ids(p["ids"], rec["ids"])
        p["u"] = at
    else:
        del profiles[key]
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--output-topic", default="peer.snapshots")
    ap.add_argument("--dlq-topic", default="peer.dlq")
    ap.add_argument("--validated-topic", default="peer.validated", help="internal topic of validated records, one key")
    ap.add_argument("--records-topic", default="peer.records", help="internal topic of resolved records, keyed by user")
    ap.add_argument("--zendesk-topic", default="zendesk.events")
    ap.add_argument("--events-topic", default="sunshine.events")
    ap.add_argument("--profiles-topic", default="sunshine.profiles")
    ap.add_argument("--settings-topic", default="context.settings")
    ap.add_argument("--partitions", type=int, default=1, help="partitions of topics the peer creates (outputs)")
    ap.add_argument("--state-dir", default=None, help="RocksDB state directory (default: a fresh temp dir)")
    ap.add_argument("--no-changelog", action="store_true", help="disable Quix changelog topics (not the default)")
    ap.add_argument("--max-events", type=int, default=1000)
    ap.add_argument("--snapshot-events", type=int, default=50)
    ap.add_argument("--idle-exit", type=float, default=5.0, help="stop after this many idle seconds (once records were seen)")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="give up if nothing arrives within this many seconds")
    ap.add_argument("--loglevel", default="WARNING")
    ap.add_argument("--ready-file", default=None,
                    help="written once the first settings record is processed (the harness then loads the inputs)")
    args = ap.parse_args()
    if args.state_dir is None:
        args.state_dir = tempfile.mkdtemp(prefix="quix-peer-")

    app, c = build(args)
    started = time.time()
    stop = threading.Event()
    outcome = {"error": None}

    def watchdog():
        while not stop.wait(0.2):
            now = time.time()
            if c.first is None:
                if now - started > args.start_timeout:
                    outcome["error"] = f"no input record within {args.start_timeout}s"
                    app.stop()
                    return
                continue
            if now - (c.last or now) >= args.idle_exit:
                app.stop()
                return

    threading.Thread(target=watchdog, daemon=True, name="idle-exit").start()
    app.run()
    stop.set()
    if outcome["error"]:
        print(f"quix_peer: {outcome['error']}", file=sys.stderr)
        sys.exit(1)
    secs = max((c.last or started) - (c.first or started), 1e-9)
    print(orjson.dumps({"mode": "quix", "records": c.inputs, "settings": c.settings,
                        "inputs_before_settings": c.inputs_before_settings, "snapshots": c.snapshots,
                        "snapshot_bytes": c.snapshot_bytes, "dead_letters": c.dead_letters, "identity_conflicts": c.conflicts,
                        "seconds": round(secs, 3), "records_per_s": round(c.inputs / secs),
                        "t_start": c.first, "t_end": c.last, "changelog": not args.no_changelog}).decode(), flush=True)


if __name__ == "__main__":
    main()
