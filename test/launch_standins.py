"""Strict stand-ins for ``launch``, ``launch_ros`` and ``ament_index_python``, and a tiny
launch service that turns a launch description into the command line ``ros2 launch`` runs.

Those packages have no PyPI wheels (docs/environment.md), so the launch file cannot be run
here for real. These stand-ins copy the real constructors' signatures (ros2/launch and
ros2/launch_ros, Humble to Rolling): keyword-only arguments where the real ones are, the same
names, and ``TypeError`` for anything else, so a misspelled keyword fails here as it would on a
robot. Values are type-checked the way the real ``normalize_*`` helpers check them
(substitutions are ``str``, a ``Substitution`` or a list of those; ``parameters`` is a list of
files and dicts; ``remappings`` are pairs). Only what the project's launch file may plausibly
use is provided; an import of anything else fails with ImportError, which is the cue to add a
faithful stand-in here.

:func:`launch` mimics ``LaunchService``: it declares the arguments (defaults, choices,
missing required ones), runs ``OpaqueFunction``\\ s, evaluates conditions and builds each
node's command line exactly as ``launch_ros.actions.Node`` does: ``<prefix>/lib/<package>/
<executable>`` found through the (stand-in) ament index, then ``arguments``, ``--ros-args``
with ``ros_arguments``, ``-r __node:=``, ``-r __ns:=`` (always absolute), ``--params-file``
for each file (a missing file is skipped with a warning, as launch_ros does) and for each
dict (written to a temporary YAML keyed by the node's full name), then ``-r from:=to``.
"""
from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

import yaml


# ------------------------------------------------------------------------------ errors
class SubstitutionFailure(RuntimeError):
    """As ``launch.substitutions.substitution_failure.SubstitutionFailure``."""


class PackageNotFoundError(KeyError):
    """As ``ament_index_python.packages.PackageNotFoundError``."""


class LaunchError(RuntimeError):
    """What ``ros2 launch`` would report and stop on (a missing required argument, a value
    outside ``choices``, an executable that is not installed, ...)."""


# ------------------------------------------------------------------------------ context
class LaunchContext:
    """The bits of ``launch.LaunchContext`` a launch file touches."""

    def __init__(self, arguments: Dict[str, str]) -> None:
        self.launch_configurations: Dict[str, str] = dict(arguments)
        self.environment: Dict[str, str] = dict(os.environ)
        self.locals = types.SimpleNamespace()

    def perform_substitution(self, substitution: 'Substitution') -> str:
        """As the real method."""
        return substitution.perform(self)


# ------------------------------------------------------------------------------ substitutions
class Substitution:
    """Base of all substitutions (``launch.Substitution``)."""

    def perform(self, context: LaunchContext) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


def _is_some_substitutions(value: Any) -> bool:
    """``SomeSubstitutionsType``: str, a Substitution, or an iterable of those."""
    if isinstance(value, (str, Substitution)):
        return True
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        return False
    return all(isinstance(v, (str, Substitution)) for v in value)


def _check_substitutions(value: Any, what: str, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not _is_some_substitutions(value):
        raise TypeError(f"'{what}' must be str, a Substitution or a list of those "
                        f'(launch SomeSubstitutionsType), got {value!r}')


def perform(context: LaunchContext, value: Any) -> str:
    """``perform_substitutions(context, normalize_to_list_of_substitutions(value))``."""
    _check_substitutions(value, 'value', optional=False)
    if isinstance(value, (str, Substitution)):
        value = [value]
    return ''.join(v if isinstance(v, str) else v.perform(context) for v in value)


class TextSubstitution(Substitution):
    def __init__(self, *, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f'TextSubstitution text must be str, got {text!r}')
        self.text = text

    def perform(self, context: LaunchContext) -> str:
        return self.text


class LaunchConfiguration(Substitution):
    def __init__(self, variable_name: Any, *, default: Any = None) -> None:
        _check_substitutions(variable_name, 'variable_name', optional=False)
        if default is not None:
            _check_substitutions(default, 'default')
        self.variable_name, self.default = variable_name, default

    def perform(self, context: LaunchContext) -> str:
        name = perform(context, self.variable_name)
        if name in context.launch_configurations:
            return context.launch_configurations[name]
        if self.default is not None:
            return perform(context, self.default)
        raise SubstitutionFailure(f"launch configuration '{name}' does not exist")


class PathJoinSubstitution(Substitution):
    def __init__(self, substitutions: Iterable[Any]) -> None:
        if isinstance(substitutions, (str, Substitution)) or \
                not isinstance(substitutions, Iterable):
            raise TypeError('PathJoinSubstitution takes a list of path parts')
        self.substitutions = list(substitutions)
        for part in self.substitutions:
            _check_substitutions(part, 'PathJoinSubstitution part', optional=False)

    def perform(self, context: LaunchContext) -> str:
        return os.path.join(*[perform(context, part) for part in self.substitutions])


class EnvironmentVariable(Substitution):
    def __init__(self, name: Any, *, default_value: Any = None) -> None:
        _check_substitutions(name, 'name', optional=False)
        _check_substitutions(default_value, 'default_value')
        self.name, self.default_value = name, default_value

    def perform(self, context: LaunchContext) -> str:
        name = perform(context, self.name)
        if name in context.environment:
            return context.environment[name]
        if self.default_value is None:
            raise SubstitutionFailure(f"environment variable '{name}' does not exist")
        return perform(context, self.default_value)


class FindPackageShare(Substitution):
    """``launch_ros.substitutions.FindPackageShare``."""

    def __init__(self, package: Any) -> None:
        _check_substitutions(package, 'package', optional=False)
        self.package = package

    def perform(self, context: LaunchContext) -> str:
        return get_package_share_directory(perform(context, self.package))


# ------------------------------------------------------------------------------ conditions
class Condition:
    def __init__(self, *, predicate: Callable[[LaunchContext], bool]) -> None:
        self._predicate = predicate

    def evaluate(self, context: LaunchContext) -> bool:
        return bool(self._predicate(context))


def _truth(context: LaunchContext, expression: Any, condition: str) -> bool:
    text = perform(context, expression).strip().lower()
    if text in ('true', '1'):
        return True
    if text in ('false', '0'):
        return False
    raise LaunchError(f'{condition} expects "true" or "false" (or 1/0), got "{text}"')


class IfCondition(Condition):
    def __init__(self, predicate_expression: Any) -> None:
        _check_substitutions(predicate_expression, 'predicate_expression', optional=False)
        super().__init__(predicate=lambda c: _truth(c, predicate_expression, 'IfCondition'))


class UnlessCondition(Condition):
    def __init__(self, predicate_expression: Any) -> None:
        _check_substitutions(predicate_expression, 'predicate_expression', optional=False)
        super().__init__(
            predicate=lambda c: not _truth(c, predicate_expression, 'UnlessCondition'))


# ------------------------------------------------------------------------------ actions
class Action:
    """``launch.Action``: only ``condition`` as a keyword."""

    def __init__(self, *, condition: Optional[Condition] = None) -> None:
        if condition is not None and not isinstance(condition, Condition):
            raise TypeError(f'condition must be a launch Condition, got {condition!r}')
        self.condition = condition


class LaunchDescription:
    def __init__(self, initial_entities: Optional[Iterable[Any]] = None, *,
                 deprecated_reason: Optional[str] = None) -> None:
        self.entities = list(initial_entities) if initial_entities is not None else []
        for entity in self.entities:
            if not isinstance(entity, (Action, LaunchDescription)):
                raise TypeError(f'LaunchDescription entities must be actions, got {entity!r}')
        self.deprecated_reason = deprecated_reason


class DeclareLaunchArgument(Action):
    def __init__(self, name: str, *, default_value: Any = None,
                 description: Optional[str] = None, choices: Optional[List[str]] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(name, str):
            raise TypeError(f'DeclareLaunchArgument name must be str, got {name!r}')
        _check_substitutions(default_value, f'{name}: default_value')
        if description is not None and not isinstance(description, str):
            raise TypeError(f'{name}: description must be str')
        if choices is not None:
            if not choices or not all(isinstance(c, str) for c in choices):
                raise TypeError(f'{name}: choices must be a non-empty list of str')
            if isinstance(default_value, str) and default_value not in choices:
                raise LaunchError(f'{name}: default_value "{default_value}" is not one of '
                                  f'the choices {choices}')
        self.name, self.default_value = name, default_value
        self.description, self.choices = description, choices


class OpaqueFunction(Action):
    def __init__(self, *, function: Callable, args: Optional[Iterable[Any]] = None,
                 kwargs: Optional[Dict[str, Any]] = None, **left_over_kwargs: Any) -> None:
        super().__init__(**left_over_kwargs)
        if not callable(function):
            raise TypeError(f"OpaqueFunction expected a callable for 'function', got "
                            f'{type(function)}')
        if args is not None and not isinstance(args, Iterable):
            raise TypeError('OpaqueFunction args must be iterable')
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError('OpaqueFunction kwargs must be a dict')
        self.function, self.args, self.kwargs = function, list(args or []), dict(kwargs or {})


class LogInfo(Action):
    def __init__(self, *, msg: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_substitutions(msg, 'msg', optional=False)
        self.msg = msg


class Shutdown(Action):
    def __init__(self, *, reason: Any = 'reason not given', **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_substitutions(reason, 'reason', optional=False)
        self.reason = reason


class SetEnvironmentVariable(Action):
    def __init__(self, name: Any, value: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_substitutions(name, 'name', optional=False)
        _check_substitutions(value, 'value', optional=False)
        self.name, self.value = name, value


#: Keywords ``launch_ros.actions.Node`` passes on to ExecuteProcess / ExecuteLocal / Action.
_PROCESS_KWARGS = {
    'prefix', 'cwd', 'env', 'additional_env',                          # ExecuteProcess
    'shell', 'sigterm_timeout', 'sigkill_timeout', 'emulate_tty', 'output', 'output_format',
    'cached_output', 'log_cmd', 'on_exit', 'respawn', 'respawn_delay',
    'respawn_max_retries',                                              # ExecuteLocal
    'condition',                                                        # Action
}
_OUTPUTS = ('log', 'screen', 'both', 'own_log', 'full')


def _check_parameter_value(value: Any, where: str) -> None:
    """``normalize_parameter_dict``'s value rules."""
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _check_substitutions(key, f'{where} key', optional=False)
            _check_parameter_value(sub, f'{where}.{key}')
    elif isinstance(value, (str, Substitution, bool, int, float, bytes)):
        return
    elif isinstance(value, Sequence):
        for item in value:
            if not isinstance(item, (str, int, float, bool, Substitution)) and not \
                    _is_some_substitutions(item):
                raise TypeError(f'{where}: unexpected list element {item!r}')
    else:
        raise TypeError(f'Unexpected type for parameter value {value!r} ({where})')


class Node(Action):
    """``launch_ros.actions.Node`` with its real keywords (and those it forwards)."""

    def __init__(self, *, executable: Any, package: Any = None, name: Any = None,
                 namespace: Any = None, exec_name: Any = None, parameters: Any = None,
                 remappings: Any = None, ros_arguments: Any = None, arguments: Any = None,
                 **kwargs: Any) -> None:
        unknown = set(kwargs) - _PROCESS_KWARGS
        if unknown:
            raise TypeError(f'Node() got unexpected keyword arguments {sorted(unknown)}')
        super().__init__(condition=kwargs.pop('condition', None))
        for what, value in (('executable', executable), ('package', package), ('name', name),
                            ('namespace', namespace), ('exec_name', exec_name)):
            _check_substitutions(value, what, optional=what != 'executable')
        if parameters is not None:
            if isinstance(parameters, str) or not isinstance(parameters, Sequence):
                raise TypeError(f'Expecting list of parameters, got {parameters!r}')
            for entry in parameters:
                if isinstance(entry, Mapping):
                    _check_parameter_value(entry, 'parameters')
                elif not isinstance(entry, pathlib.Path):
                    _check_substitutions(entry, 'parameters file')
        if remappings is not None:
            remappings = list(remappings)
            for rule in remappings:
                if not (isinstance(rule, tuple) and len(rule) == 2):
                    raise TypeError(f'remappings must be (from, to) pairs, got {rule!r}')
                for part in rule:
                    _check_substitutions(part, 'remapping', optional=False)
        for what, value in (('arguments', arguments), ('ros_arguments', ros_arguments)):
            if value is None:
                continue
            if isinstance(value, (str, Substitution)) or not isinstance(value, Iterable):
                raise TypeError(f'{what} must be a list, got {value!r}')
            for item in value:
                _check_substitutions(item, what, optional=False)
        output = kwargs.get('output', 'log')
        if isinstance(output, str) and output not in _OUTPUTS:
            raise TypeError(f"output must be one of {_OUTPUTS}, got '{output}'")
        for flag in ('emulate_tty', 'shell', 'cached_output', 'log_cmd'):
            if flag in kwargs and not isinstance(kwargs[flag], bool):
                raise TypeError(f'{flag} must be a bool, got {kwargs[flag]!r}')
        self.executable, self.package, self.name, self.namespace = (
            executable, package, name, namespace)
        self.parameters = list(parameters) if parameters is not None else None
        self.remappings = remappings
        self.arguments, self.ros_arguments = arguments, ros_arguments
        self.process_kwargs = kwargs


# ------------------------------------------------------------------------------ ament index
_PREFIXES: List[str] = []


def _prefixes() -> List[str]:
    if _PREFIXES:
        return list(_PREFIXES)
    return [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p]


def get_package_prefix(package_name: str) -> str:
    """The install prefix whose ament index lists ``package_name``."""
    if not isinstance(package_name, str):
        raise TypeError('package_name must be str')
    for prefix in _prefixes():
        marker = os.path.join(prefix, 'share', 'ament_index', 'resource_index', 'packages',
                              package_name)
        if os.path.isfile(marker):
            return prefix
    raise PackageNotFoundError(f"package '{package_name}' not found, searching: {_prefixes()}")


def get_package_share_directory(package_name: str, print_warning: bool = True) -> str:
    """``<prefix>/share/<package_name>``."""
    return os.path.join(get_package_prefix(package_name), 'share', package_name)


# ------------------------------------------------------------------------------ modules
MODULES = {
    'launch': {'LaunchDescription': LaunchDescription, 'LaunchContext': LaunchContext,
               'Substitution': Substitution, 'Action': Action, 'Condition': Condition},
    'launch.actions': {c.__name__: c for c in (DeclareLaunchArgument, OpaqueFunction, LogInfo,
                                               Shutdown, SetEnvironmentVariable)},
    'launch.substitutions': {c.__name__: c for c in (
        LaunchConfiguration, PathJoinSubstitution, TextSubstitution, EnvironmentVariable,
        SubstitutionFailure)},
    'launch.conditions': {'IfCondition': IfCondition, 'UnlessCondition': UnlessCondition},
    'launch_ros': {},
    'launch_ros.actions': {'Node': Node},
    'launch_ros.substitutions': {'FindPackageShare': FindPackageShare},
    'ament_index_python': {'get_package_share_directory': get_package_share_directory,
                           'get_package_prefix': get_package_prefix,
                           'PackageNotFoundError': PackageNotFoundError},
    'ament_index_python.packages': {'get_package_share_directory': get_package_share_directory,
                                    'get_package_prefix': get_package_prefix,
                                    'PackageNotFoundError': PackageNotFoundError},
}


def install(monkeypatch: Any, prefixes: Sequence[str]) -> None:
    """Put the stand-in modules in ``sys.modules`` (undone by ``monkeypatch``) with an ament
    index made of ``prefixes``."""
    for name, attrs in MODULES.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        if '.' not in name:
            module.__path__ = []  # a package, so `import launch.actions` works
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys.modules[__name__], '_PREFIXES', list(prefixes))


# ------------------------------------------------------------------------------ launching
@dataclass
class Process:
    """One node as ``ros2 launch`` would start it."""

    cmd: List[str]
    node_name: str
    namespace: str
    output: str
    env: Dict[str, str]


@dataclass
class Launched:
    """What :func:`launch` did."""

    processes: List[Process] = field(default_factory=list)
    configurations: Dict[str, str] = field(default_factory=dict)
    declared: Dict[str, DeclareLaunchArgument] = field(default_factory=dict)
    log: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    shutdown: Optional[str] = None


def _namespace(value: str) -> str:
    return value if value.startswith('/') else '/' + value


def _node_cmd(node: Node, context: LaunchContext, launched: Launched,
              tmp_dir: str) -> Process:
    executable = perform(context, node.executable)
    if node.package is not None:
        package = perform(context, node.package)
        prefix = get_package_prefix(package)
        path = os.path.join(prefix, 'lib', package, executable)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise LaunchError(f"executable '{executable}' not found on the libexec directory "
                              f"'{os.path.join(prefix, 'lib', package)}'")
    else:
        path = executable
    cmd = [path] + [perform(context, a) for a in node.arguments or []]
    if node.ros_arguments is not None:
        cmd += ['--ros-args'] + [perform(context, a) for a in node.ros_arguments]
    cmd += ['--ros-args']
    name = perform(context, node.name) if node.name is not None else None
    if name is not None:
        if not name or '/' in name:
            raise LaunchError(f'invalid node name "{name}"')
        cmd += ['-r', f'__node:={name}']
    namespace = perform(context, node.namespace) if node.namespace is not None else None
    if namespace is not None:
        namespace = _namespace(namespace)
        cmd += ['-r', f'__ns:={namespace}']
    full_name = (namespace or '/').rstrip('/') + '/' + (name or '')
    for entry in node.parameters or []:
        if isinstance(entry, Mapping):
            values = _evaluate_dict(entry, context)
            fd, path_ = tempfile.mkstemp(prefix='launch_params_', dir=tmp_dir)
            with os.fdopen(fd, 'w') as f:
                yaml.dump({full_name if name and namespace is not None else '/**':
                           {'ros__parameters': values}}, f, default_flow_style=False)
            cmd += ['--params-file', path_]
        else:
            path_ = str(entry) if isinstance(entry, pathlib.Path) else perform(context, entry)
            if not os.path.isfile(path_):
                launched.warnings.append(f'Parameter file path is not a file: {path_}')
                continue  # what launch_ros does: the node then starts without that file
            cmd += ['--params-file', path_]
    for src, dst in node.remappings or []:
        cmd += ['-r', f'{perform(context, src)}:={perform(context, dst)}']
    output = node.process_kwargs.get('output', 'log')
    return Process(cmd=cmd, node_name=name or '', namespace=namespace or '/',
                   output=perform(context, output), env=dict(context.environment))


def _evaluate_dict(values: Mapping, context: LaunchContext, prefix: str = '') -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in values.items():
        key = prefix + perform(context, key)
        if isinstance(value, Mapping):
            out.update(_evaluate_dict(value, context, key + '.'))
        elif isinstance(value, (Substitution, str)) or (
                isinstance(value, Sequence) and value and all(
                    isinstance(v, Substitution) for v in value)):
            text = perform(context, value)
            # launch_ros reads substituted values back as YAML: '5' becomes an int.
            out[key] = yaml.safe_load(text) if isinstance(value, Substitution) else text
        elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            items = [perform(context, v) if not isinstance(v, (int, float, bool)) else v
                     for v in value]
            kinds = {type(v) for v in items}
            if kinds and kinds <= {int, float} and float in kinds:
                items = [float(v) for v in items]
            elif len(kinds) > 1:
                items = [str(v) for v in items]
            out[key] = items
        else:
            out[key] = value
    return out


def launch(description: LaunchDescription, arguments: Optional[Dict[str, str]] = None, *,
           tmp_dir: Optional[str] = None) -> Launched:
    """Run ``description`` as ``ros2 launch ... name:=value`` would, without starting anything.

    Raises:
        LaunchError, SubstitutionFailure: where ``ros2 launch`` would fail.
    """
    if not isinstance(description, LaunchDescription):
        raise TypeError('generate_launch_description() must return a LaunchDescription')
    for key, value in (arguments or {}).items():
        if not isinstance(value, str):
            raise TypeError(f'launch arguments are strings on the command line: {key}={value!r}')
    context = LaunchContext(arguments or {})
    launched = Launched()
    tmp_dir = tmp_dir or tempfile.mkdtemp(prefix='cbpnet_launch_')

    def visit(entity: Any) -> None:
        if launched.shutdown is not None:
            return
        if isinstance(entity, LaunchDescription):
            for child in entity.entities:
                visit(child)
            return
        if not isinstance(entity, Action):
            raise TypeError(f'not a launch entity: {entity!r}')
        if entity.condition is not None and not entity.condition.evaluate(context):
            return
        if isinstance(entity, DeclareLaunchArgument):
            launched.declared[entity.name] = entity
            if entity.name not in context.launch_configurations:
                if entity.default_value is None:
                    raise LaunchError(f"Included launch description missing required "
                                      f"argument '{entity.name}'")
                context.launch_configurations[entity.name] = perform(context,
                                                                     entity.default_value)
            value = context.launch_configurations[entity.name]
            if entity.choices is not None and value not in entity.choices:
                raise LaunchError(f"Argument '{entity.name}' provided value '{value}' is not "
                                  f'valid. Valid options are: {entity.choices}')
        elif isinstance(entity, OpaqueFunction):
            result = entity.function(context, *entity.args, **entity.kwargs)
            if result is not None:
                if isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
                    raise TypeError('an OpaqueFunction must return a list of entities or None')
                for child in result:
                    visit(child)
        elif isinstance(entity, LogInfo):
            launched.log.append(perform(context, entity.msg))
        elif isinstance(entity, Shutdown):
            launched.shutdown = perform(context, entity.reason)
        elif isinstance(entity, SetEnvironmentVariable):
            context.environment[perform(context, entity.name)] = perform(context, entity.value)
        elif isinstance(entity, Node):
            launched.processes.append(_node_cmd(entity, context, launched, tmp_dir))
        else:
            raise TypeError(f'no stand-in behaviour for {type(entity).__name__}')

    visit(description)
    launched.configurations = dict(context.launch_configurations)
    return launched
