"""
A stateful Kubernetes API emulator for Repobox tests, built on kmock's ``KubernetesScaffold``.

kmock gives us the aiohttp handler shape, Kubernetes URL parsing and API discovery
(``/api``, ``/apis``, ``/apis/{group}/{version}``). Its own ``KubernetesEmulator`` is too
simple for kube-runtime (no resourceVersions, no selectors, no status subresource, ...),
and it scans every object on every request, which is too slow for 10,000 objects.
So resource requests (anything with a plural in the path) are served by the
:class:`Store` below; everything else falls through to kmock.

The approximations are documented in ``README.md`` next to this file.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import datetime
import json
import random
import re
import string
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
from kmock import KubernetesScaffold, ResourceInfo, resource
from kmock._internal import parsing

JSON = dict[str, Any]

# How many watch events per resource are kept for watches that resume from a resourceVersion.
HISTORY_PER_RESOURCE = 20_000
# How many request records `GET /_emulator/requests` can return (oldest dropped first).
REQUEST_LOG_SIZE = 200_000
# A watch without timeoutSeconds ends after this long (the real server picks 30-60 minutes).
DEFAULT_WATCH_TIMEOUT = 1800.0
# An idle watch that allows bookmarks gets one this often.
BOOKMARK_INTERVAL = 15.0


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


class ApiError(Exception):
    """An error answered as a Kubernetes ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self) -> JSON:
        body: JSON = {
            'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
            'message': self.message, 'reason': self.reason, 'code': self.code,
        }
        if self.details is not None:
            body['details'] = self.details
        return body


REASONS = {
    400: 'BadRequest', 401: 'Unauthorized', 403: 'Forbidden', 404: 'NotFound', 405: 'MethodNotAllowed',
    409: 'Conflict', 410: 'Expired', 415: 'UnsupportedMediaType', 422: 'Invalid',
    429: 'TooManyRequests', 500: 'InternalError', 503: 'ServiceUnavailable', 504: 'Timeout',
}


@attrs.define
class ResourceDef:
    """What the emulator knows about one served resource (one group/version/plural)."""
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ''
    shortnames: list[str] = attrs.field(factory=list)
    # Whether `/status` is a subresource: then main writes ignore .status and vice versa.
    status_subresource: bool = False
    # Whether metadata.generation is maintained (CRs and built-ins with a spec/status split).
    generation: bool = False
    # The DELETE propagation when none is given (batch/v1 Jobs orphan their pods, like the real API).
    default_propagation: str = 'Background'
    # Storage is shared by all versions of one group/plural (no conversion: apiVersion is rewritten).
    @property
    def skey(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def api_version(self) -> str:
        return f'{self.group}/{self.version}' if self.group else self.version

    @property
    def qualified(self) -> str:
        return f'{self.plural}.{self.group}' if self.group else self.plural


BUILTINS = [
    ResourceDef('', 'v1', 'namespaces', 'Namespace', False, 'namespace', ['ns']),
    ResourceDef('', 'v1', 'secrets', 'Secret', True, 'secret'),
    ResourceDef('', 'v1', 'configmaps', 'ConfigMap', True, 'configmap', ['cm']),
    ResourceDef('', 'v1', 'pods', 'Pod', True, 'pod', ['po'], status_subresource=True, generation=True),
    ResourceDef('', 'v1', 'events', 'Event', True, 'event', ['ev']),
    ResourceDef('', 'v1', 'serviceaccounts', 'ServiceAccount', True, 'serviceaccount', ['sa']),
    ResourceDef('', 'v1', 'services', 'Service', True, 'service', ['svc'], status_subresource=True),
    ResourceDef('', 'v1', 'nodes', 'Node', False, 'node', ['no'], status_subresource=True),
    ResourceDef('events.k8s.io', 'v1', 'events', 'Event', True, 'event', ['ev']),
    ResourceDef('coordination.k8s.io', 'v1', 'leases', 'Lease', True, 'lease'),
    ResourceDef('batch', 'v1', 'jobs', 'Job', True, 'job', [], status_subresource=True, generation=True,
                default_propagation='Orphan'),
    ResourceDef('apps', 'v1', 'deployments', 'Deployment', True, 'deployment', ['deploy'],
                status_subresource=True, generation=True),
    ResourceDef('rbac.authorization.k8s.io', 'v1', 'roles', 'Role', True, 'role'),
    ResourceDef('rbac.authorization.k8s.io', 'v1', 'rolebindings', 'RoleBinding', True, 'rolebinding'),
    ResourceDef('rbac.authorization.k8s.io', 'v1', 'clusterroles', 'ClusterRole', False, 'clusterrole'),
    ResourceDef('rbac.authorization.k8s.io', 'v1', 'clusterrolebindings', 'ClusterRoleBinding', False,
                'clusterrolebinding'),
    ResourceDef('apiextensions.k8s.io', 'v1', 'customresourcedefinitions', 'CustomResourceDefinition',
                False, 'customresourcedefinition', ['crd', 'crds'], status_subresource=True, generation=True),
]


# ---------------------------------------------------------------------------------------------
# Selectors
# ---------------------------------------------------------------------------------------------

def _split_terms(selector: str) -> list[str]:
    """Split a selector on commas that are not inside ``(...)``."""
    terms, depth, cur = [], 0, []
    for ch in selector:
        if ch == '(':
            depth += 1
        elif ch == ')':
            depth -= 1
        if ch == ',' and depth == 0:
            terms.append(''.join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    terms.append(''.join(cur).strip())
    return [t for t in terms if t]


_SET_TERM = re.compile(r'^\s*([^\s!=()]+)\s+(in|notin)\s*\(([^)]*)\)\s*$')


def parse_label_selector(selector: str | None) -> Callable[[dict[str, str]], bool]:
    """Compile a label selector (equality- and set-based) into a predicate over a labels dict."""
    if not selector:
        return lambda labels: True
    checks: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_terms(selector):
        m = _SET_TERM.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(',') if v.strip()}
            if op == 'in':
                checks.append(lambda l, k=key, vs=values: l.get(k) in vs)
            else:
                checks.append(lambda l, k=key, vs=values: l.get(k) not in vs)
        elif '!=' in term:
            key, value = (s.strip() for s in term.split('!=', 1))
            checks.append(lambda l, k=key, v=value: l.get(k) != v)
        elif '==' in term or '=' in term:
            key, value = (s.strip() for s in re.split('==?', term, maxsplit=1))
            checks.append(lambda l, k=key, v=value: l.get(k) == v)
        elif term.startswith('!'):
            key = term[1:].strip()
            checks.append(lambda l, k=key: k not in l)
        elif re.fullmatch(r'[A-Za-z0-9._/-]+', term):
            checks.append(lambda l, k=term: k in l)
        else:
            raise ApiError(400, 'BadRequest', f'unable to parse requirement: {term!r}')
    return lambda labels: all(check(labels) for check in checks)


def _field_value(obj: JSON, path: str) -> str:
    cur: Any = obj
    for part in path.split('.'):
        if not isinstance(cur, dict):
            return ''
        cur = cur.get(part)
    if cur is None:
        return ''
    if isinstance(cur, bool):
        return 'true' if cur else 'false'
    return str(cur)


def parse_field_selector(selector: str | None) -> Callable[[JSON], bool]:
    """Compile a field selector (``a.b=c``, ``a.b==c``, ``a.b!=c``) over dotted object paths."""
    if not selector:
        return lambda obj: True
    checks: list[Callable[[JSON], bool]] = []
    for term in _split_terms(selector):
        if '!=' in term:
            key, value = term.split('!=', 1)
            checks.append(lambda o, k=key.strip(), v=value.strip(): _field_value(o, k) != v)
        elif '=' in term:
            key, value = re.split('==?', term, maxsplit=1)
            checks.append(lambda o, k=key.strip(), v=value.strip(): _field_value(o, k) == v)
        else:
            raise ApiError(400, 'BadRequest', f'invalid field selector: {term!r}')
    return lambda obj: all(check(obj) for check in checks)


# ---------------------------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes a key, lists are replaced)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A small subset of strategic merge patch: merge-patch plus ``$patch: delete``/``replace``
    directives on maps. Lists are replaced, not merged by key (documented approximation)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get('$patch')
    if directive == 'delete':
        return None
    if directive == 'replace':
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != '$patch'}
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith('$'):
            continue
        if value is None:
            result.pop(key, None)
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def apply_patch(current: JSON | None, content_type: str, body: bytes) -> JSON:
    """Apply a PATCH body of any supported content type to the current object."""
    ctype = content_type.split(';')[0].strip().lower()
    try:
        if ctype == 'application/json-patch+json':
            ops = json.loads(body)
            return jsonpatch.apply_patch(current or {}, ops)
        patch = _parse_json_or_yaml(body)
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(422, 'Invalid', f'the patch could not be applied: {e}')
    if not isinstance(patch, dict):
        raise ApiError(400, 'BadRequest', 'the patch body must be an object')
    if ctype == 'application/merge-patch+json':
        return merge_patch(current or {}, patch)
    if ctype == 'application/strategic-merge-patch+json':
        return strategic_merge_patch(current or {}, patch)
    if ctype == 'application/apply-patch+yaml':
        return apply_merge(current or {}, patch)
    raise ApiError(415, 'UnsupportedMediaType', f'the body of the request was in an unknown format: {ctype}')


def apply_merge(current: Any, applied: Any) -> Any:
    """Server-side apply, approximated: the applied configuration is merged into the live object.

    There is no field ownership: fields the manager stopped applying are kept (real SSA would
    remove fields that this manager alone owned), and lists are replaced as a whole.
    """
    if not isinstance(applied, dict):
        return copy.deepcopy(applied)
    result = dict(current) if isinstance(current, dict) else {}
    for key, value in applied.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge(result.get(key), value)
    return result


def _parse_json_or_yaml(body: bytes) -> Any:
    text = body.decode('utf-8') if body else '{}'
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        import yaml  # type: ignore[import-untyped]  # optional: only for hand-written YAML apply bodies
    except ImportError:
        raise ApiError(415, 'UnsupportedMediaType',
                       'this emulator accepts JSON bodies only (install PyYAML for YAML apply bodies)')
    return yaml.safe_load(text)


def parse_path(path: str) -> parsing.ParsedPath:
    """kmock's URL parsing, plus the namespaces resource itself (``/api/v1/namespaces[/{name}[/status]]``),
    which kmock reads as a namespace prefix."""
    parts = path.strip('/').split('/')
    if parts[:2] == ['api', 'v1'] and len(parts) >= 3 and parts[2] == 'namespaces':
        rest = parts[3:]
        if len(rest) == 0:
            return parsing.ParsedPath('', 'v1', 'namespaces')
        if len(rest) == 1 or (len(rest) == 2 and rest[1] in ('status', 'finalize')):
            return parsing.ParsedPath('', 'v1', 'namespaces', None, rest[0], rest[1] if len(rest) == 2 else None)
    return parsing.parse_path(path)


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------

@attrs.define(eq=False)
class Watcher:
    rdef: ResourceDef
    namespace: str | None
    name: str | None
    labels: Callable[[dict[str, str]], bool]
    fields: Callable[[JSON], bool]
    queue: asyncio.Queue[tuple[int, str, JSON] | None] = attrs.field(factory=asyncio.Queue)

    def matches(self, obj: JSON) -> bool:
        meta = obj.get('metadata') or {}
        if self.namespace is not None and meta.get('namespace') != self.namespace:
            return False
        if self.name is not None and meta.get('name') != self.name:
            return False
        return self.labels(meta.get('labels') or {}) and self.fields(obj)


class Store:
    """All objects, the global resourceVersion counter, watch history and watchers.

    Every method is synchronous: asyncio runs one at a time, so no lock is needed and a
    watch can snapshot the state and register itself atomically.
    """

    def __init__(self) -> None:
        self.rv = 0
        self.defs: dict[tuple[str, str, str], ResourceDef] = {}
        self.objects: dict[tuple[str, str], dict[tuple[str, str], JSON]] = collections.defaultdict(dict)
        self.history: dict[tuple[str, str], collections.deque[tuple[int, str, JSON]]] = \
            collections.defaultdict(lambda: collections.deque(maxlen=HISTORY_PER_RESOURCE))
        # The resourceVersion of the newest event dropped from history; older watches get 410.
        self.floor: dict[tuple[str, str], int] = collections.defaultdict(int)
        self.watchers: dict[tuple[str, str], set[Watcher]] = collections.defaultdict(set)
        # owner uid -> {(skey, (namespace, name))}, for garbage collection.
        self.dependents: dict[str, set[tuple[tuple[str, str], tuple[str, str]]]] = collections.defaultdict(set)
        self.uids: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {}
        # The propagationPolicy of a delete that waits for finalizers, by uid.
        self._pending_propagation: dict[str, str] = {}
        self.on_register: Callable[[ResourceDef], None] = lambda rdef: None
        self.on_unregister: Callable[[ResourceDef], None] = lambda rdef: None

    # -- resources --------------------------------------------------------------------------

    def register(self, rdef: ResourceDef) -> None:
        self.defs[(rdef.group, rdef.version, rdef.plural)] = rdef
        self.on_register(rdef)

    def unregister(self, rdef: ResourceDef) -> None:
        self.defs.pop((rdef.group, rdef.version, rdef.plural), None)
        self.on_unregister(rdef)

    def lookup(self, group: str, version: str, plural: str) -> ResourceDef:
        rdef = self.defs.get((group, version, plural))
        if rdef is None:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource',
                           {'group': group, 'kind': plural})
        return rdef

    def defs_for(self, skey: tuple[str, str]) -> ResourceDef | None:
        for rdef in self.defs.values():
            if rdef.skey == skey:
                return rdef
        return None

    # -- helpers ----------------------------------------------------------------------------

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def not_found(self, rdef: ResourceDef, name: str) -> ApiError:
        return ApiError(404, 'NotFound', f'{rdef.qualified} "{name}" not found',
                        {'name': name, 'group': rdef.group, 'kind': rdef.plural})

    def conflict(self, rdef: ResourceDef, name: str) -> ApiError:
        return ApiError(409, 'Conflict',
                        f'Operation cannot be fulfilled on {rdef.qualified} "{name}": the object has been '
                        'modified; please apply your changes to the latest version and try again',
                        {'name': name, 'group': rdef.group, 'kind': rdef.plural})

    def view(self, rdef: ResourceDef, obj: JSON) -> JSON:
        """The object as served under this version (storage is version-agnostic)."""
        if obj.get('apiVersion') != rdef.api_version:
            obj = dict(obj)
            obj['apiVersion'] = rdef.api_version
        return obj

    def emit(self, rdef: ResourceDef, etype: str, obj: JSON) -> None:
        rv = int(obj['metadata']['resourceVersion'])
        hist = self.history[rdef.skey]
        if len(hist) == hist.maxlen:
            self.floor[rdef.skey] = hist[0][0]
        hist.append((rv, etype, obj))
        for watcher in list(self.watchers[rdef.skey]):
            if watcher.matches(obj):
                watcher.queue.put_nowait((rv, etype, obj))

    def _index_owners(self, skey: tuple[str, str], key: tuple[str, str], obj: JSON, add: bool) -> None:
        for ref in (obj.get('metadata') or {}).get('ownerReferences') or []:
            uid = ref.get('uid')
            if not uid:
                continue
            if add:
                self.dependents[uid].add((skey, key))
            else:
                deps = self.dependents.get(uid)
                if deps is not None:
                    deps.discard((skey, key))
                    if not deps:
                        del self.dependents[uid]

    def _put(self, rdef: ResourceDef, key: tuple[str, str], old: JSON | None, new: JSON) -> None:
        if old is not None:
            self._index_owners(rdef.skey, key, old, add=False)
        self.objects[rdef.skey][key] = new
        self._index_owners(rdef.skey, key, new, add=True)
        self.uids[new['metadata']['uid']] = (rdef.skey, key)

    def _remove(self, rdef: ResourceDef, key: tuple[str, str]) -> JSON:
        obj = self.objects[rdef.skey].pop(key)
        self._index_owners(rdef.skey, key, obj, add=False)
        self.uids.pop(obj['metadata']['uid'], None)
        gone = copy.copy(obj)
        gone['metadata'] = dict(obj['metadata'], resourceVersion=str(self.next_rv()))
        self.emit(rdef, 'DELETED', gone)
        return gone

    def expire(self) -> None:
        """Make every resourceVersion so far too old and end all open watches (tests relists)."""
        self.next_rv()
        for skey in list(self.history):
            self.history[skey].clear()
        for skey in set(self.history) | set(self.watchers) | set(self.objects):
            self.floor[skey] = self.rv
        for watchers in self.watchers.values():
            for watcher in watchers:
                watcher.queue.put_nowait(None)

    # -- reads ------------------------------------------------------------------------------

    def get(self, rdef: ResourceDef, namespace: str | None, name: str) -> JSON:
        obj = self.objects[rdef.skey].get((namespace or '', name))
        if obj is None:
            raise self.not_found(rdef, name)
        return self.view(rdef, obj)

    def list(self, rdef: ResourceDef, namespace: str | None, params: dict[str, str]) -> JSON:
        labels = parse_label_selector(params.get('labelSelector'))
        fields = parse_field_selector(params.get('fieldSelector'))
        limit = int(params.get('limit') or 0)
        cont = params.get('continue') or ''
        list_rv = self.rv
        after: tuple[str, str] | None = None
        if cont:
            try:
                token = json.loads(base64.urlsafe_b64decode(cont.encode()))
                list_rv, after = int(token['rv']), (token['ns'], token['name'])
            except Exception:
                raise ApiError(400, 'BadRequest', 'continue key is not valid')
            if list_rv < self.floor[rdef.skey]:
                raise ApiError(410, 'Expired', 'The provided continue parameter is too old to display a '
                               'consistent list result. You can start a new list without the continue parameter.')
        items = []
        for key in sorted(self.objects[rdef.skey]):
            if namespace is not None and key[0] != namespace:
                continue
            if after is not None and key <= after:
                continue
            obj = self.objects[rdef.skey][key]
            if labels((obj['metadata'].get('labels')) or {}) and fields(obj):
                items.append(key)
        meta: JSON = {'resourceVersion': str(list_rv)}
        if limit and len(items) > limit:
            rest = len(items) - limit
            items = items[:limit]
            last = items[-1]
            meta['continue'] = base64.urlsafe_b64encode(
                json.dumps({'rv': list_rv, 'ns': last[0], 'name': last[1]}).encode()).decode()
            meta['remainingItemCount'] = rest
        return {
            'kind': f'{rdef.kind}List', 'apiVersion': rdef.api_version, 'metadata': meta,
            'items': [self.view(rdef, self.objects[rdef.skey][key]) for key in items],
        }

    # -- writes -----------------------------------------------------------------------------

    def create(self, rdef: ResourceDef, namespace: str | None, body: JSON, dry_run: bool = False) -> JSON:
        if not isinstance(body, dict):
            raise ApiError(400, 'BadRequest', 'the body of the request must be an object')
        obj = copy.deepcopy(body)
        meta = obj.setdefault('metadata', {})
        if not meta.get('name'):
            if meta.get('generateName'):
                suffix = ''.join(random.choices(string.ascii_lowercase + string.digits, k=5))
                meta['name'] = meta['generateName'] + suffix
            else:
                raise ApiError(422, 'Invalid', f'{rdef.kind} "" is invalid: metadata.name: Required value: '
                               'name or generateName is required',
                               {'group': rdef.group, 'kind': rdef.kind,
                                'causes': [{'reason': 'FieldValueRequired', 'field': 'metadata.name'}]})
        name = meta['name']
        if rdef.namespaced:
            ns = namespace or meta.get('namespace') or 'default'
            if meta.get('namespace') and namespace and meta['namespace'] != namespace:
                raise ApiError(400, 'BadRequest', 'the namespace of the provided object does not match '
                               'the namespace sent on the request')
            meta['namespace'] = ns
        else:
            ns = ''
            meta.pop('namespace', None)
        key = (ns, name)
        if key in self.objects[rdef.skey]:
            raise ApiError(409, 'AlreadyExists', f'{rdef.qualified} "{name}" already exists',
                           {'name': name, 'group': rdef.group, 'kind': rdef.plural})
        obj['apiVersion'] = rdef.api_version
        obj['kind'] = rdef.kind
        for field in ('deletionTimestamp', 'deletionGracePeriodSeconds', 'resourceVersion', 'managedFields'):
            meta.pop(field, None)
        meta['uid'] = str(uuid.uuid4())
        meta['creationTimestamp'] = now_rfc3339()
        if rdef.generation:
            meta['generation'] = 1
        else:
            meta.pop('generation', None)
        if rdef.status_subresource:
            obj.pop('status', None)
            if rdef.plural == 'pods' and rdef.group == '':
                obj['status'] = {'phase': 'Pending', 'qosClass': 'BestEffort'}
        if rdef.skey == ('apiextensions.k8s.io', 'customresourcedefinitions'):
            self._crd_accept(obj)
        if dry_run:
            meta['resourceVersion'] = str(self.rv)
            return self.view(rdef, obj)
        meta['resourceVersion'] = str(self.next_rv())
        self._put(rdef, key, None, obj)
        self.emit(rdef, 'ADDED', obj)
        if rdef.skey == ('apiextensions.k8s.io', 'customresourcedefinitions'):
            self._crd_register(obj)
        return self.view(rdef, obj)

    def update(self, rdef: ResourceDef, namespace: str | None, name: str, new: JSON,
               subresource: str | None, expected_rv: str | None = None, dry_run: bool = False) -> JSON:
        """Store ``new`` as the next version of an existing object (the common end of PUT and PATCH)."""
        key = (namespace or '', name) if rdef.namespaced else ('', name)
        old = self.objects[rdef.skey].get(key)
        if old is None:
            raise self.not_found(rdef, name)
        if not isinstance(new, dict):
            raise ApiError(400, 'BadRequest', 'the body of the request must be an object')
        if expected_rv and expected_rv != old['metadata']['resourceVersion']:
            raise self.conflict(rdef, name)
        new_meta = new.get('metadata') if isinstance(new.get('metadata'), dict) else {}
        if new_meta.get('name') not in (None, name):
            raise ApiError(400, 'BadRequest', 'the name of the object does not match the name on the URL')
        if subresource == 'status':
            if not rdef.status_subresource:
                raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
            obj = copy.deepcopy(old)
            if 'status' in new:
                obj['status'] = copy.deepcopy(new['status'])
            else:
                obj.pop('status', None)
        elif subresource:
            raise ApiError(404, 'NotFound', f'the server could not find the requested resource ({subresource})')
        else:
            obj = copy.deepcopy(new)
            obj['metadata'] = dict(new_meta)
            if rdef.status_subresource:
                if 'status' in old:
                    obj['status'] = copy.deepcopy(old['status'])
                else:
                    obj.pop('status', None)
        meta = obj['metadata']
        old_meta = old['metadata']
        # Server-owned metadata cannot be changed by clients.
        for field in ('uid', 'creationTimestamp', 'deletionTimestamp', 'deletionGracePeriodSeconds',
                      'generation', 'namespace', 'name', 'resourceVersion'):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        meta.pop('managedFields', None)
        obj['apiVersion'] = rdef.api_version
        obj['kind'] = rdef.kind
        if rdef.skey == ('apiextensions.k8s.io', 'customresourcedefinitions'):
            self._crd_accept(obj)
        if self._same(old, obj):
            return self.view(rdef, old)  # a no-op write changes nothing and sends no event
        if rdef.generation and self._spec_changed(rdef, old, obj):
            meta['generation'] = int(old_meta.get('generation') or 0) + 1
        if dry_run:
            return self.view(rdef, obj)
        meta['resourceVersion'] = str(self.next_rv())
        self._put(rdef, key, old, obj)
        if meta.get('deletionTimestamp') and not meta.get('finalizers'):
            gone = self._remove(rdef, key)
            self._after_removal(rdef, gone)
            return self.view(rdef, gone)
        self.emit(rdef, 'MODIFIED', obj)
        if rdef.skey == ('apiextensions.k8s.io', 'customresourcedefinitions'):
            self._crd_register(obj)
        return self.view(rdef, obj)

    @staticmethod
    def _same(old: JSON, new: JSON) -> bool:
        a = dict(old, metadata={k: v for k, v in old['metadata'].items() if k != 'resourceVersion'})
        b = dict(new, metadata={k: v for k, v in new['metadata'].items() if k != 'resourceVersion'})
        a.pop('apiVersion', None)
        b.pop('apiVersion', None)
        return a == b

    @staticmethod
    def _spec_changed(rdef: ResourceDef, old: JSON, new: JSON) -> bool:
        if rdef.status_subresource:
            return old.get('spec') != new.get('spec')
        strip = lambda o: {k: v for k, v in o.items() if k not in ('metadata', 'status', 'apiVersion')}
        return strip(old) != strip(new)

    def delete(self, rdef: ResourceDef, namespace: str | None, name: str, options: JSON) -> tuple[JSON, bool]:
        """Delete or mark for deletion. Returns (object, removed_now)."""
        key = (namespace or '', name) if rdef.namespaced else ('', name)
        obj = self.objects[rdef.skey].get(key)
        if obj is None:
            raise self.not_found(rdef, name)
        pre = options.get('preconditions') or {}
        if pre.get('uid') and pre['uid'] != obj['metadata']['uid']:
            raise ApiError(409, 'Conflict', f'Precondition failed: UID in precondition: {pre["uid"]}, '
                           f'UID in object meta: {obj["metadata"]["uid"]}')
        if pre.get('resourceVersion') and pre['resourceVersion'] != obj['metadata']['resourceVersion']:
            raise self.conflict(rdef, name)
        propagation = options.get('propagationPolicy')
        if propagation is None and options.get('orphanDependents') is not None:
            propagation = 'Orphan' if options['orphanDependents'] else 'Background'
        propagation = propagation or rdef.default_propagation
        if options.get('dryRun'):
            return self.view(rdef, obj), False
        meta = obj['metadata']
        if meta.get('finalizers'):
            if meta.get('deletionTimestamp'):
                return self.view(rdef, obj), False
            new = copy.deepcopy(obj)
            new['metadata']['deletionTimestamp'] = now_rfc3339()
            new['metadata']['deletionGracePeriodSeconds'] = 0
            new['metadata']['resourceVersion'] = str(self.next_rv())
            self._put(rdef, key, obj, new)
            self._pending_propagation[new['metadata']['uid']] = propagation
            self.emit(rdef, 'MODIFIED', new)
            return self.view(rdef, new), False
        self._pending_propagation[meta['uid']] = propagation
        gone = self._remove(rdef, key)
        self._after_removal(rdef, gone)
        return self.view(rdef, gone), True

    def _after_removal(self, rdef: ResourceDef, gone: JSON) -> None:
        """Garbage collection after an object is really gone: dependents, CRD resources, namespaces."""
        uid = gone['metadata']['uid']
        propagation = self._pending_propagation.pop(uid, rdef.default_propagation)
        deps = sorted(self.dependents.pop(uid, set()))
        for dskey, dkey in deps:
            dep = self.objects[dskey].get(dkey)
            drdef = self.defs_for(dskey)
            if dep is None or drdef is None:
                continue
            if propagation == 'Orphan':
                new = copy.deepcopy(dep)
                refs = [r for r in new['metadata'].get('ownerReferences') or [] if r.get('uid') != uid]
                if refs:
                    new['metadata']['ownerReferences'] = refs
                else:
                    new['metadata'].pop('ownerReferences', None)
                new['metadata']['resourceVersion'] = str(self.next_rv())
                self._put(drdef, dkey, dep, new)
                self.emit(drdef, 'MODIFIED', new)
                continue
            # Deleted only when none of its owners is left (an object may have several owners).
            owners = [r.get('uid') for r in dep['metadata'].get('ownerReferences') or []]
            if any(o in self.uids for o in owners if o):
                continue
            try:
                self.delete(drdef, dkey[0] or None, dkey[1], {'propagationPolicy': 'Background'})
            except ApiError:
                pass
        if rdef.skey == ('apiextensions.k8s.io', 'customresourcedefinitions'):
            self._crd_unregister(gone)
        if rdef.skey == ('', 'namespaces'):
            ns = gone['metadata']['name']
            for skey, objs in list(self.objects.items()):
                drdef = self.defs_for(skey)
                if drdef is None or not drdef.namespaced:
                    continue
                for okey in [k for k in objs if k[0] == ns]:
                    if okey in objs:
                        try:
                            self.delete(drdef, okey[0], okey[1], {'propagationPolicy': 'Background'})
                        except ApiError:
                            pass

    # -- CRDs -------------------------------------------------------------------------------

    @staticmethod
    def _crd_accept(crd: JSON) -> None:
        """Set the status a real apiserver's CRD controllers would set (names accepted, established)."""
        spec = crd.get('spec') or {}
        now = now_rfc3339()
        names = spec.get('names') or {}
        crd['status'] = {
            'acceptedNames': names,
            'storedVersions': [v['name'] for v in spec.get('versions') or [] if v.get('storage')],
            'conditions': [
                {'type': 'NamesAccepted', 'status': 'True', 'reason': 'NoConflicts',
                 'message': 'no conflicts found', 'lastTransitionTime': now},
                {'type': 'Established', 'status': 'True', 'reason': 'InitialNamesAccepted',
                 'message': 'the initial names have been accepted', 'lastTransitionTime': now},
            ],
        }

    def _crd_defs(self, crd: JSON) -> list[ResourceDef]:
        spec = crd.get('spec') or {}
        names = spec.get('names') or {}
        defs = []
        for v in spec.get('versions') or []:
            if not v.get('served', True):
                continue
            defs.append(ResourceDef(
                group=spec.get('group', ''), version=v['name'], plural=names.get('plural', ''),
                kind=names.get('kind', ''), namespaced=spec.get('scope', 'Namespaced') == 'Namespaced',
                singular=names.get('singular') or names.get('kind', '').lower(),
                shortnames=list(names.get('shortNames') or []),
                status_subresource='status' in ((v.get('subresources') or {})),
                generation=True,
            ))
        return defs

    def _crd_register(self, crd: JSON) -> None:
        spec = crd.get('spec') or {}
        plural = (spec.get('names') or {}).get('plural', '')
        for rdef in [d for d in self.defs.values() if d.skey == (spec.get('group', ''), plural)]:
            self.unregister(rdef)
        for rdef in self._crd_defs(crd):
            self.register(rdef)

    def _crd_unregister(self, crd: JSON) -> None:
        spec = crd.get('spec') or {}
        skey = (spec.get('group', ''), (spec.get('names') or {}).get('plural', ''))
        rdef = self.defs_for(skey)
        if rdef is not None:
            for key in list(self.objects[skey]):
                if key in self.objects[skey]:
                    self._pending_propagation[self.objects[skey][key]['metadata']['uid']] = 'Background'
                    gone = self._remove(rdef, key)
                    self._after_removal(rdef, gone)
        for d in [d for d in self.defs.values() if d.skey == skey]:
            self.unregister(d)


# ---------------------------------------------------------------------------------------------
# Faults & the request log
# ---------------------------------------------------------------------------------------------

@attrs.define
class Fault:
    method: str | None
    path_regex: re.Pattern[str]
    status: int
    count: int | None
    message: str
    retry_after: int

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method.upper() == method.upper()) and \
            self.path_regex.search(path) is not None


# ---------------------------------------------------------------------------------------------
# The HTTP handler
# ---------------------------------------------------------------------------------------------

@attrs.define(kw_only=True)
class RepoboxEmulator(KubernetesScaffold):
    """kmock's scaffold (discovery, URL parsing) plus a real object store and watch streams."""

    store: Store = attrs.field(factory=Store)
    faults: list[Fault] = attrs.field(factory=list)
    request_log: collections.deque[JSON] = attrs.field(factory=lambda: collections.deque(maxlen=REQUEST_LOG_SIZE))
    watch_tasks: set[asyncio.Task[Any]] = attrs.field(factory=set)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store.on_register = self._discover
        self.store.on_unregister = self._undiscover
        for rdef in BUILTINS:
            self.store.register(rdef)
        for ns in ('default', 'kube-system', 'kube-public', 'kube-node-lease'):
            self.store.create(self.store.lookup('', 'v1', 'namespaces'), None,
                              {'metadata': {'name': ns}, 'spec': {'finalizers': ['kubernetes']},
                               'status': {'phase': 'Active'}})

    # kmock serves discovery from `self._resources`; keep it in sync with the store.
    def _discover(self, rdef: ResourceDef) -> None:
        verbs = ['create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch']
        self._resources[resource(rdef.group, rdef.version, rdef.plural)] = ResourceInfo(
            namespaced=rdef.namespaced, kind=rdef.kind, singular=rdef.singular, verbs=verbs,
            shortnames=rdef.shortnames, subresources=['status'] if rdef.status_subresource else [])

    def _undiscover(self, rdef: ResourceDef) -> None:
        res = resource(rdef.group, rdef.version, rdef.plural)
        if res in self._resources:
            del self._resources[res]

    async def _serve_server_version(self, request: Any) -> Any:
        return {'major': '1', 'minor': '33', 'gitVersion': 'v1.33.0-repobox-emulator',
                'gitCommit': '0000000000000000000000000000000000000000', 'gitTreeState': 'clean',
                'buildDate': '2025-04-23T00:00:00Z', 'goVersion': 'go1.24.2', 'compiler': 'gc',
                'platform': 'linux/amd64'}

    # -- entry point ------------------------------------------------------------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        record: JSON = {'method': raw.method, 'path': raw.path, 'query': raw.query_string,
                        'status': 0, 'time': time.time()}
        path = raw.path
        try:
            if path.startswith('/_emulator/'):
                response = await self._serve_control(raw)
                return response  # control requests are not logged
            self.request_log.append(record)
            fault = self._take_fault(raw.method, path)
            if fault is not None:
                raise ApiError(fault.status, REASONS.get(fault.status, 'Unknown'), fault.message,
                               {'retryAfterSeconds': fault.retry_after} if fault.status == 429 else None,
                               {'Retry-After': str(fault.retry_after)} if fault.status == 429 else None)
            if path in ('/healthz', '/readyz', '/livez'):
                response = aiohttp.web.Response(text='ok')
            else:
                parsed = parse_path(path)
                if parsed.group is not None and parsed.plural is not None:
                    response = await self._serve_resource(raw, parsed)
                else:
                    response = await super().__call__(raw)  # kmock: discovery, /version, 404s
        except ApiError as e:
            response = aiohttp.web.json_response(e.status(), status=e.code, headers=e.headers)
        except Exception as e:  # a bug here must still answer like a Kubernetes server
            print(f'emulator error: {e!r}', file=sys.stderr)
            import traceback
            traceback.print_exc()
            response = aiohttp.web.json_response(
                ApiError(500, 'InternalError', f'emulator error: {e!r}').status(), status=500)
        record['status'] = response.status
        return response

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path):
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    # -- /_emulator/* -----------------------------------------------------------------------

    async def _serve_control(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        path, method = raw.path, raw.method
        if path == '/_emulator/health':
            return aiohttp.web.json_response({'ok': True, 'resourceVersion': str(self.store.rv)})
        if path == '/_emulator/faults':
            if method == 'POST':
                spec = await raw.json()
                specs = spec if isinstance(spec, list) else [spec]
                for s in specs:
                    status = int(s['status'])
                    self.faults.append(Fault(
                        method=s.get('method'), path_regex=re.compile(s.get('path_regex') or '.*'),
                        status=status, count=s.get('count'),
                        message=s.get('message') or f'injected fault: {status}',
                        retry_after=int(s.get('retry_after', 1))))
                return aiohttp.web.json_response({'faults': len(self.faults)})
            if method == 'DELETE':
                self.faults.clear()
                return aiohttp.web.json_response({'faults': 0})
            if method == 'GET':
                return aiohttp.web.json_response([
                    {'method': f.method, 'path_regex': f.path_regex.pattern, 'status': f.status, 'count': f.count}
                    for f in self.faults])
        if path == '/_emulator/requests':
            if method == 'DELETE':
                self.request_log.clear()
                return aiohttp.web.json_response([])
            return aiohttp.web.json_response(list(self.request_log))
        if path == '/_emulator/expire' and method == 'POST':
            self.store.expire()
            return aiohttp.web.json_response({'resourceVersion': str(self.store.rv)})
        if path == '/_emulator/stats':
            return aiohttp.web.json_response({
                'resourceVersion': self.store.rv,
                'objects': {f'{g}/{p}': len(objs) for (g, p), objs in self.store.objects.items()},
                'watchers': sum(len(w) for w in self.store.watchers.values()),
                'requests': len(self.request_log),
            })
        raise ApiError(404, 'NotFound', f'unknown emulator control endpoint: {method} {path}')

    # -- resources --------------------------------------------------------------------------

    async def _serve_resource(self, raw: aiohttp.web.BaseRequest, p: parsing.ParsedPath) -> aiohttp.web.StreamResponse:
        store = self.store
        rdef = store.lookup(p.group or '', p.version or '', p.plural or '')
        params = dict(raw.query)
        method = raw.method.upper()
        ns = p.namespace if rdef.namespaced else None
        if p.namespace is not None and not rdef.namespaced:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        dry_run = params.get('dryRun') == 'All'
        body = await raw.read()

        if p.name is None:
            if method == 'GET':
                if params.get('watch') in ('true', '1'):
                    return await self._serve_watch(raw, rdef, ns, None, params)
                return aiohttp.web.json_response(store.list(rdef, ns, params))
            if method == 'POST':
                obj = store.create(rdef, ns, _parse_json_or_yaml(body), dry_run=dry_run)
                return aiohttp.web.json_response(obj, status=201)
            if method == 'DELETE':
                listed = store.list(rdef, ns, {k: v for k, v in params.items() if k != 'limit'})
                options = json.loads(body) if body else {}
                options.setdefault('propagationPolicy', params.get('propagationPolicy'))
                if options['propagationPolicy'] is None:
                    options.pop('propagationPolicy')
                items = []
                for item in listed['items']:
                    meta = item['metadata']
                    try:
                        obj, _ = store.delete(rdef, meta.get('namespace'), meta['name'], options)
                        items.append(obj)
                    except ApiError:
                        pass
                return aiohttp.web.json_response(dict(listed, items=items))
            raise ApiError(405, 'MethodNotAllowed', f'{method} is not allowed on a collection')

        if method == 'GET':
            if params.get('watch') in ('true', '1'):
                return await self._serve_watch(raw, rdef, ns, p.name, params)
            if p.subresource not in (None, 'status'):
                raise ApiError(404, 'NotFound', f'the server could not find the requested resource ({p.subresource})')
            return aiohttp.web.json_response(store.get(rdef, ns, p.name))
        if method == 'PUT':
            new = _parse_json_or_yaml(body)
            expected = ((new.get('metadata') or {}).get('resourceVersion') or None) if isinstance(new, dict) else None
            obj = store.update(rdef, ns, p.name, new, p.subresource, expected, dry_run=dry_run)
            return aiohttp.web.json_response(obj)
        if method == 'PATCH':
            ctype = raw.headers.get('Content-Type', 'application/merge-patch+json')
            is_apply = ctype.split(';')[0].strip().lower() == 'application/apply-patch+yaml'
            if is_apply and not params.get('fieldManager'):
                raise ApiError(422, 'Invalid', 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: '
                               'Required value: is required for apply patch')
            key = (ns or '', p.name)
            current = store.objects[rdef.skey].get(key)
            if current is None:
                if not is_apply:
                    raise store.not_found(rdef, p.name)
                if p.subresource:
                    raise store.not_found(rdef, p.name)
                new = apply_patch({}, ctype, body)
                new.setdefault('metadata', {})['name'] = p.name
                obj = store.create(rdef, ns, new, dry_run=dry_run)
                return aiohttp.web.json_response(obj, status=201)
            base = store.view(rdef, current)
            if is_apply:
                patch_body = _parse_json_or_yaml(body)
                if isinstance(patch_body, dict) and (patch_body.get('metadata') or {}).get('resourceVersion'):
                    pass  # precondition honoured below
            new = apply_patch(base, ctype, body)
            if not isinstance(new, dict):
                raise ApiError(422, 'Invalid', 'the patched object is not an object')
            # A resourceVersion in the patch is an optimistic-lock precondition.
            patched_rv = (new.get('metadata') or {}).get('resourceVersion')
            expected = patched_rv if patched_rv != current['metadata']['resourceVersion'] else None
            obj = store.update(rdef, ns, p.name, new, p.subresource, expected, dry_run=dry_run)
            return aiohttp.web.json_response(obj)
        if method == 'DELETE':
            options = json.loads(body) if body else {}
            if params.get('propagationPolicy'):
                options['propagationPolicy'] = params['propagationPolicy']
            if params.get('dryRun'):
                options['dryRun'] = [params['dryRun']]
            obj, removed = store.delete(rdef, ns, p.name, options)
            if removed:
                return aiohttp.web.json_response({
                    'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success',
                    'details': {'name': p.name, 'group': rdef.group, 'kind': rdef.plural,
                                'uid': obj['metadata']['uid']}})
            return aiohttp.web.json_response(obj)
        raise ApiError(405, 'MethodNotAllowed', f'{method} is not allowed')

    # -- watch ------------------------------------------------------------------------------

    async def _serve_watch(self, raw: aiohttp.web.BaseRequest, rdef: ResourceDef, ns: str | None,
                           name: str | None, params: dict[str, str]) -> aiohttp.web.StreamResponse:
        store = self.store
        fields = params.get('fieldSelector')
        watcher = Watcher(rdef=rdef, namespace=ns, name=name,
                          labels=parse_label_selector(params.get('labelSelector')),
                          fields=parse_field_selector(fields))
        timeout = float(params.get('timeoutSeconds') or DEFAULT_WATCH_TIMEOUT)
        bookmarks = params.get('allowWatchBookmarks') in ('true', '1')
        initial_events = params.get('sendInitialEvents') in ('true', '1')
        rv_param = params.get('resourceVersion') or ''

        # Snapshot + registration happen without an await in between: no event is lost or doubled.
        initial: list[tuple[str, JSON]] = []
        gone = False
        if initial_events or rv_param in ('', '0'):
            for obj in store.objects[rdef.skey].values():
                if watcher.matches(obj):
                    initial.append(('ADDED', obj))
            initial.sort(key=lambda e: int(e[1]['metadata']['resourceVersion']))
        else:
            try:
                since = int(rv_param)
            except ValueError:
                raise ApiError(400, 'BadRequest', f'invalid resource version: {rv_param!r}')
            if since < store.floor[rdef.skey]:
                gone = True
            else:
                for erv, etype, obj in store.history[rdef.skey]:
                    if erv > since and watcher.matches(obj):
                        initial.append((etype, obj))
        snapshot_rv = store.rv
        if not gone:
            store.watchers[rdef.skey].add(watcher)

        response = aiohttp.web.StreamResponse(status=200, headers={'Content-Type': 'application/json'})
        await response.prepare(raw)
        try:
            if gone:
                await self._write_event(response, rdef, 'ERROR', ApiError(
                    410, 'Expired', f'too old resource version: {rv_param} ({store.floor[rdef.skey] + 1})').status())
                return response
            for etype, obj in initial:
                await self._write_event(response, rdef, etype, obj)
            if initial_events:
                await self._write_event(response, rdef, 'BOOKMARK', self._bookmark(
                    rdef, snapshot_rv, {'k8s.io/initial-events-end': 'true'}))
            deadline = time.monotonic() + timeout
            last_rv = snapshot_rv
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), min(remaining, BOOKMARK_INTERVAL))
                except asyncio.TimeoutError:
                    if bookmarks and time.monotonic() < deadline:
                        last_rv = max(last_rv, store.rv)
                        await self._write_event(response, rdef, 'BOOKMARK', self._bookmark(rdef, last_rv))
                    continue
                if item is None:  # expired by the control endpoint: end without a bookmark
                    bookmarks = False
                    break
                erv, etype, obj = item
                last_rv = erv
                await self._write_event(response, rdef, etype, obj)
            if bookmarks:
                # Everything queued has been sent, so the current rv is a safe resume point.
                if watcher.queue.empty():
                    last_rv = max(last_rv, store.rv)
                await self._write_event(response, rdef, 'BOOKMARK', self._bookmark(rdef, last_rv))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            store.watchers[rdef.skey].discard(watcher)
        try:
            await response.write_eof()
        except ConnectionResetError:
            pass
        return response

    @staticmethod
    def _bookmark(rdef: ResourceDef, rv: int, annotations: dict[str, str] | None = None) -> JSON:
        meta: JSON = {'resourceVersion': str(rv)}
        if annotations:
            meta['annotations'] = annotations
        return {'kind': rdef.kind, 'apiVersion': rdef.api_version, 'metadata': meta}

    async def _write_event(self, response: aiohttp.web.StreamResponse, rdef: ResourceDef,
                           etype: str, obj: JSON) -> None:
        if etype not in ('ERROR', 'BOOKMARK'):
            obj = self.store.view(rdef, obj)
        await response.write(json.dumps({'type': etype, 'object': obj}, separators=(',', ':')).encode() + b'\n')


async def serve(host: str, port: int) -> None:
    """Run the emulator until cancelled; prints one ready line with the URL on stdout."""
    emulator = RepoboxEmulator()
    async with emulator:
        server = aiohttp.web.Server(emulator, access_log=None)
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(server, host, port)
        actual_port = srv.sockets[0].getsockname()[1]
        print(f'REPOBOX-EMULATOR READY url=http://{host}:{actual_port} port={actual_port}', flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            srv.close()
            await server.shutdown(1.0)
