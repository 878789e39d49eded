"""LIBERO as the runtime sees it: one task, the official OpenVLA evaluation protocol, timed steps.

Protocol (openvla/openvla experiments/robot/libero/run_libero_eval.py): OffScreenRenderEnv at 256x256,
env.seed(seed), then per episode env.reset() + set_init_state(init_states[episode]), 10 settle steps with
the dummy action, then at most the suite's horizon of policy steps; success is the env's `done`.
Only the agentview camera is rendered (the official code also renders the wrist camera it never uses).
With render=False (a policy that reads only privileged state, the scripted expert) nothing is rendered:
LIBERO's ControlEnv is built with no offscreen renderer and no camera observables, and Observation.image is
None, so a step costs physics only.

Every Observation carries `state`, the privileged sim state (robosuite's names and conventions):
- "robot0_eef_pos" (3,) the grip site, metres, world frame; "robot0_eef_quat" (4,) the hand, x y z w;
- "robot0_gripper_qpos" (2,) the finger joints (about +0.04 / -0.04 fully open, 0 / 0 closed);
- per object of the task's scene, keyed by its BDDL name (e.g. "alphabet_soup_1", "basket_1"):
  "<name>_pos" (3,) body origin, "<name>_quat" (4,) x y z w, and "<name>_bbox" (2, 3): the world-frame
  axis-aligned box (min row, max row) around the object's collision geoms, for grasp and clearance heights.

Inside each step we time, separately:
- physics: the MuJoCo substeps: mj_forward, the arm controller, mj_step (25 substeps of 2 ms per 50 ms step);
- render: the offscreen render + pixel read of the agentview camera, which robosuite does inside the
  substep loop when the camera observable samples (once per step).
The rest of a step (other observables, success predicates, observation dict) is Python overhead.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import gc
import io
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from rtloop.clock import now
from rtloop.errors import InputError, SimError
from rtloop.sim.base import Observation, StepResult

STANDARD_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")

# Max policy steps after the settle steps, from run_libero_eval.py ("longest training demo + margin").
# The chapter's 300 is libero_goal's value; libero_object's is 280.
SUITE_HORIZONS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}

DUMMY_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # hold still, gripper open
CAMERA = "agentview"


def horizon_for(suite: str) -> int:
    """The standard suites' horizons; LIBERO-PRO variants ("libero_object_with_mug") take their base suite's.
    A suite with no standard base (libero_mine, libero_100) gets the longest, 520."""
    if suite in SUITE_HORIZONS:
        return SUITE_HORIZONS[suite]
    bases = [s for s in SUITE_HORIZONS if suite.startswith(s + "_")]
    return SUITE_HORIZONS[max(bases, key=len)] if bases else max(SUITE_HORIZONS.values())


def _import_libero() -> tuple[Any, Any, Callable[[str], str]]:
    """Import LIBERO quietly: robosuite's macro-file warnings are noise for a CLI; its errors still show.
    Returns (benchmark module, the envs module: ControlEnv and OffScreenRenderEnv, get_libero_path)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    # robosuite's DefaultLogger only sets levels on its handlers, so the logger's own level filters first.
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # robosuite calls the deprecated Logger.warn
            from libero.libero import benchmark, get_libero_path
            from libero.libero.envs import env_wrapper
    except Exception as e:
        raise SimError(_describe_failure("importing LIBERO failed", e)) from None
    return benchmark, env_wrapper, get_libero_path


def suite_names() -> list[str]:
    """The five standard suites first, then the LIBERO-PRO variants the installed package registers."""
    benchmark, _, _ = _import_libero()
    others = sorted(set(benchmark.get_benchmark_dict()) - set(STANDARD_SUITES))
    return [*STANDARD_SUITES, *others]


def load_task(suite: str, task_id: int) -> tuple[Any, Any]:
    """(benchmark suite object, task) for a suite name and task id, or a one-line InputError."""
    benchmark, _, _ = _import_libero()
    suites = benchmark.get_benchmark_dict()
    if suite not in suites:
        names = suite_names()
        close = difflib.get_close_matches(suite, names, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise InputError(
            f"unknown LIBERO suite {suite!r}{hint}; valid suites: {', '.join(STANDARD_SUITES)}, "
            f"and {len(names) - len(STANDARD_SUITES)} LIBERO-PRO variants ({', '.join(names[5:8])}, ...)"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # "[info] Applying task order index 0 ..."
        bench = suites[suite]()
    if bench.n_tasks == 0:
        raise InputError(f"LIBERO suite {suite!r} has no tasks in this installation")
    if not 0 <= task_id < bench.n_tasks:
        tasks = [bench.get_task(i).language for i in range(bench.n_tasks)]
        shown = ", ".join(f"{i}={t[:40]}" for i, t in enumerate(tasks[:10]))
        more = f", ... ({len(tasks)} tasks)" if len(tasks) > 10 else ""
        raise InputError(f"task id {task_id} is out of range for {suite}: 0..{bench.n_tasks - 1} ({shown}{more})")
    return bench, bench.get_task(task_id)


_RENDER_PATHS = ("/renderers/context/", "/OpenGL/", "/mujoco/egl", "/mujoco/osmesa")


def _describe_failure(what: str, exc: BaseException) -> str:
    """One line naming the original error and, when rendering is involved, MUJOCO_GL and the GL library."""
    message = f"{what}: {type(exc).__name__}: {exc}".replace("\n", " ")
    frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
    if not any(p in f for f in frames for p in _RENDER_PATHS):
        return message
    backend = os.environ.get("MUJOCO_GL", "")
    library = {"egl": "libEGL.so.1", "osmesa": "libOSMesa.so"}.get(backend, "libGL.so.1")
    try:
        ctypes.CDLL(library)
        library_state = f"{library} loads"
    except OSError as load_error:
        library_state = f"{library} cannot be loaded ({load_error})"
    return (
        f"{message} (rendering failed with MUJOCO_GL={backend or 'unset'}; {library_state}; "
        "LIBERO needs MUJOCO_GL=egl and a working libEGL: the libegl1 package or a GPU driver)"
    )


def _swallow_unraisable(_: Any) -> None:
    pass


def _create_env(env_wrapper: Any, bddl_file: str, camera_size: int, seed: int, render: bool, what: str) -> Any:
    """The official eval env, rendering only the policy camera (no depth, segmentation or wrist camera);
    with render=False, ControlEnv with no renderer at all (OffScreenRenderEnv forces one on)."""
    saved_hook = sys.unraisablehook
    try:
        try:
            if render:
                env = env_wrapper.OffScreenRenderEnv(
                    bddl_file_name=bddl_file,
                    camera_names=[CAMERA],
                    camera_heights=camera_size,
                    camera_widths=camera_size,
                    camera_depths=False,
                    camera_segmentations=None,
                )
            else:
                env = env_wrapper.ControlEnv(
                    bddl_file_name=bddl_file,
                    has_renderer=False,
                    has_offscreen_renderer=False,
                    use_camera_obs=False,
                    camera_names=[],
                )
            env.seed(seed)
            return env
        except Exception as e:
            failure = _describe_failure(f"creating the LIBERO env for {what} failed", e)
            # The half-built GL context complains from __del__ when this traceback is freed; the
            # SimError already says everything, so silence that noise while it is collected.
            sys.unraisablehook = _swallow_unraisable
        gc.collect()
        raise SimError(failure)
    finally:
        sys.unraisablehook = saved_hook


ROBOT_STATE_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")

_BOX_CORNERS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)


class _SceneState:
    """The privileged state of one built scene (see the module docstring). Geom ids are looked up once per
    MjSim: robosuite builds a new one on every reset."""

    def __init__(self, robot_env: Any) -> None:
        model = robot_env.sim.model
        self._data = robot_env.sim.data
        self._names = list(robot_env.objects_dict)
        body_ids = {name: robot_env.obj_body_id[name] for name in self._names}
        # An object's geoms hang off its body or the body's descendants; only colliding ones shape the box.
        owner = {}
        for body in range(model.nbody):
            root = body
            while root and root not in body_ids.values():
                root = model.body_parentid[root]
            if root:
                owner[body] = root
        self._geoms = {
            name: np.array([
                g for g in range(model.ngeom)
                if owner.get(model.geom_bodyid[g]) == bid and (model.geom_contype[g] or model.geom_conaffinity[g])
            ], dtype=np.int64)
            for name, bid in body_ids.items()
        }
        self._aabb = model.geom_aabb  # per geom: centre (3) and half sizes (3) in the geom's frame

    def bbox(self, name: str) -> np.ndarray:
        geoms = self._geoms[name]
        local = self._aabb[geoms, None, :3] + self._aabb[geoms, None, 3:] * _BOX_CORNERS  # [G, 8, 3]
        rot = self._data.geom_xmat[geoms].reshape(-1, 3, 3)
        world = np.einsum("gij,gkj->gki", rot, local) + self._data.geom_xpos[geoms, None, :]
        points = world.reshape(-1, 3)
        return np.stack([points.min(axis=0), points.max(axis=0)])

    def read(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        state = {key: np.array(obs[key], dtype=np.float64) for key in ROBOT_STATE_KEYS}
        for name in self._names:
            state[f"{name}_pos"] = np.array(obs[f"{name}_pos"], dtype=np.float64)
            state[f"{name}_quat"] = np.array(obs[f"{name}_quat"], dtype=np.float64)
            state[f"{name}_bbox"] = self.bbox(name)
        return state


class _StageClock:
    """Seconds spent inside wrapped callables, per stage. Wrappers live on one env's instances only.

    Only the outermost wrapped call counts, because robosuite nests them (the controller calls mj_forward).
    """

    def __init__(self) -> None:
        self.totals = {"physics": 0.0, "render": 0.0}
        self._depth = 0

    def reset(self) -> None:
        self.totals = {"physics": 0.0, "render": 0.0}

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[stage] += now() - start
                self._depth -= 1

        return timed


class LiberoEnv:
    label = "libero"

    def __init__(
        self,
        suite: str = "libero_object",
        task_id: int = 0,
        camera_size: int = 256,
        seed: int = 0,
        settle_steps: int = 10,
        render: bool = True,
    ) -> None:
        bench, task = load_task(suite, task_id)  # bad suite / task fail here, before the ~8 s env build
        _, env_wrapper, get_libero_path = _import_libero()
        self.suite = suite
        self.task_id = task_id
        self.task_name = task.name
        self.instruction = task.language
        self.horizon = horizon_for(suite)
        self.settle_steps = settle_steps
        self.render = render
        self.init_states = bench.get_task_init_states(task_id)
        bddl_file = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        self._clock = _StageClock()
        self._steps = 0
        self._env = _create_env(env_wrapper, bddl_file, camera_size, seed, render, f"{suite} task {task_id}")
        self._scene: _SceneState | None = None
        robot_env = self._env.env
        robot_env._pre_action = self._clock.wrap("physics", robot_env._pre_action)

    def reset(self, episode: int) -> Observation:
        if not 0 <= episode < len(self.init_states):
            raise InputError(
                f"episode {episode} is outside the {len(self.init_states)} init states of "
                f"{self.suite} task {self.task_id} (0..{len(self.init_states) - 1})"
            )
        try:
            self._env.reset()
            self._instrument_sim()  # hard_reset builds a new MjSim on every reset
            self._scene = _SceneState(self._env.env)
            obs = self._env.set_init_state(self.init_states[episode])
            for _ in range(self.settle_steps):
                obs, _, _, _ = self._env.step(DUMMY_ACTION)
        except Exception as e:
            raise SimError(_describe_failure(f"LIBERO reset to episode {episode} failed", e)) from e
        self._steps = 0
        return self._observation(obs)

    def _observation(self, obs: dict[str, np.ndarray]) -> Observation:
        image = obs[f"{CAMERA}_image"] if self.render else None
        return Observation(image, self._scene.read(obs))

    def _instrument_sim(self) -> None:
        sim = self._env.sim
        sim.forward = self._clock.wrap("physics", sim.forward)
        sim.step = self._clock.wrap("physics", sim.step)
        sim.render = self._clock.wrap("render", sim.render)

    def step(self, action: np.ndarray) -> StepResult:
        self._clock.reset()
        try:
            obs, _, env_done, _ = self._env.step(action)
        except Exception as e:
            raise SimError(_describe_failure(f"LIBERO step {self._steps} failed", e)) from e
        self._steps += 1
        success = bool(env_done)
        return StepResult(
            obs=self._observation(obs),
            done=success or self._steps >= self.horizon,
            success=success,
            timings=dict(self._clock.totals),
        )

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
