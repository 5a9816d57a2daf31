"""The stack oo-ml replaces, as a peer to measure against: FastAPI + JSON doing Score's work.

uvicorn (one worker, uvloop, httptools) serving `POST /score` and `POST /reward` over
HTTP/1.1 with JSON bodies validated by pydantic, as the seeds ran it. It keeps per-user,
per-arm ridge models in memory (A⁻¹ by Sherman–Morrison, b, and θ = A⁻¹b kept current on
reward), builds the same 12 features as oo-ml's `v2` (bias, hour and weekday as sin/cos,
task load, four profile rates and the preferred-hour alignment), and decides by
epsilon-greedy (ε = 0.1) over the request's candidates in one vectorised product. The
decision is kept in memory until its reward. It does no durable logging, no auth and
no shadows: a competent but lean implementation, so the comparison flatters the peer
rather than oo-ml.

Run: `python -m bench.fastapi_peer [--port 0]`; it prints `fastapi-peer listening on
HOST:PORT` once its socket accepts connections.
"""

import argparse
import math
import random
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

D = 12
EPSILON = 0.1
RIDGE_LAMBDA = 1.0
MAX_DECISIONS = 1_000_000
TWO_PI = 2.0 * math.pi


def features(context: dict[str, Any], profile: dict[str, Any]) -> np.ndarray:
    """The 12 `v2` dims; a missing value takes the contract's fallback, as in oo-ml."""
    hour = float(context.get("hour_of_day", 12) or 0)
    dow = float(context.get("day_of_week", 0) or 0)
    open_tasks = float(context.get("open_tasks", 0) or 0)
    overdue = float(context.get("overdue_tasks", 0) or 0)
    pref = profile.get("preferred_hour")
    dwell = min(float(profile.get("mean_dwell_s", 0.0) or 0.0), 600.0) / 600.0
    return np.array(
        [
            1.0,
            math.sin(TWO_PI * hour / 24.0),
            math.cos(TWO_PI * hour / 24.0),
            math.sin(TWO_PI * dow / 7.0),
            math.cos(TWO_PI * dow / 7.0),
            math.log1p(open_tasks) / 5.0,
            math.log1p(overdue) / 5.0,
            float(profile.get("completion_rate_30d", 0.0) or 0.0),
            float(profile.get("dismiss_rate_30d", 0.0) or 0.0),
            dwell,
            math.cos(TWO_PI * (hour - float(pref)) / 24.0) if pref is not None else 0.0,
            math.log1p(float(profile.get("tip_volume_30d", 0) or 0)) / 5.0,
        ]
    )


@dataclass
class UserModel:
    """One user's arms: stacked A⁻¹ (K, D, D), b (K, D) and θ (K, D), grown as arms appear."""

    index: dict[str, int] = field(default_factory=dict)
    a_inv: np.ndarray = field(default_factory=lambda: np.empty((0, D, D)))
    b: np.ndarray = field(default_factory=lambda: np.empty((0, D)))
    theta: np.ndarray = field(default_factory=lambda: np.empty((0, D)))

    def rows(self, arms: list[str]) -> list[int]:
        new = [a for a in dict.fromkeys(arms) if a not in self.index]
        if new:
            k = len(self.index)
            for i, a in enumerate(new):
                self.index[a] = k + i
            n = len(new)
            eye = np.broadcast_to(np.eye(D) / RIDGE_LAMBDA, (n, D, D))
            self.a_inv = np.concatenate([self.a_inv, eye])
            self.b = np.concatenate([self.b, np.zeros((n, D))])
            self.theta = np.concatenate([self.theta, np.zeros((n, D))])
        return [self.index[a] for a in arms]

    def update(self, arm: str, x: np.ndarray, reward: float) -> None:
        i = self.rows([arm])[0]
        a_inv = self.a_inv[i]
        ax = a_inv @ x
        a_inv -= np.outer(ax, ax) / (1.0 + x @ ax)
        self.b[i] += reward * x
        self.theta[i] = a_inv @ self.b[i]


class Bandit:
    """Per-user ridge models and pending decisions, all in memory."""

    def __init__(self, seed: int | None = None) -> None:
        self.users: dict[str, UserModel] = {}
        self.pending: dict[str, tuple[str, str, np.ndarray]] = {}
        self.rng = random.Random(seed)

    def score(
        self,
        user_id: str,
        candidates: list[tuple[str, str]],
        context: dict[str, Any],
        profile: dict[str, Any],
    ) -> dict[str, Any]:
        model = self.users.get(user_id)
        if model is None:
            model = self.users[user_id] = UserModel()
        arms = [arm or tip for tip, arm in candidates]
        x = features(context, profile)
        rows = model.rows(arms)  # before reading theta: new arms replace the arrays
        scores = model.theta[rows] @ x
        n = len(candidates)
        greedy = int(np.argmax(scores))
        explored = self.rng.random() < EPSILON
        chosen = self.rng.randrange(n) if explored else greedy
        p_other = EPSILON / n
        order = sorted(range(n), key=lambda i: -scores[i])
        decision_id = uuid.uuid4().hex
        if len(self.pending) >= MAX_DECISIONS:
            self.pending.pop(next(iter(self.pending)))
        self.pending[decision_id] = (user_id, arms[chosen], x)
        return {
            "decision_id": decision_id,
            "chosen_tip_id": candidates[chosen][0],
            "explored": explored,
            "ranking": [
                {
                    "tip_id": candidates[i][0],
                    "arm": arms[i],
                    "score": float(scores[i]),
                    "propensity": p_other + (1.0 - EPSILON if i == greedy else 0.0),
                }
                for i in order
            ],
        }

    def reward(self, decision_id: str, reward: float) -> dict[str, Any] | None:
        """Apply a reward once; None for an unknown decision, applied=False for a repeat."""
        found = self.pending.pop(decision_id, None)
        if found is None:
            return None
        user_id, arm, x = found
        self.users[user_id].update(arm, x, reward)
        return {"applied": True, "arm": arm}


def create_app(bandit: Bandit | None = None) -> Any:
    """The FastAPI app; imported lazily so the model above needs only numpy."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field

    class Candidate(BaseModel):
        tip_id: str = Field(min_length=1, max_length=256)
        arm: str = Field("", max_length=256)

    class Context(BaseModel):
        hour_of_day: int | None = Field(None, ge=0, le=23)
        day_of_week: int | None = Field(None, ge=0, le=6)
        open_tasks: int | None = Field(None, ge=0, le=100_000)
        overdue_tasks: int | None = Field(None, ge=0, le=100_000)

    class Profile(BaseModel):
        completion_rate_30d: float | None = Field(None, ge=0, le=1)
        dismiss_rate_30d: float | None = Field(None, ge=0, le=1)
        mean_dwell_s: float | None = Field(None, ge=0)
        preferred_hour: int | None = Field(None, ge=0, le=23)
        tip_volume_30d: int | None = Field(None, ge=0)

    class ScoreRequest(BaseModel):
        user_id: str = Field(min_length=1, max_length=256)
        candidates: list[Candidate] = Field(min_length=1, max_length=100)
        context: Context = Field(default_factory=Context)
        profile_features: Profile = Field(default_factory=Profile)

    class RewardRequest(BaseModel):
        decision_id: str = Field(min_length=1, max_length=128)
        reward: float = Field(ge=-1, le=1, allow_inf_nan=False)

    state = bandit or Bandit()
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/score")
    async def score(req: ScoreRequest) -> JSONResponse:
        tips = [c.tip_id for c in req.candidates]
        if len(set(tips)) != len(tips):
            raise HTTPException(400, "candidates: tip_id must be unique")
        return JSONResponse(
            state.score(
                req.user_id,
                [(c.tip_id, c.arm) for c in req.candidates],
                req.context.model_dump(exclude_none=True),
                req.profile_features.model_dump(exclude_none=True),
            )
        )

    @app.post("/reward")
    async def reward(req: RewardRequest) -> JSONResponse:
        out = state.reward(req.decision_id, req.reward)
        if out is None:
            raise HTTPException(404, "unknown or already rewarded decision")
        return JSONResponse(out)

    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ns = ap.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ns.host, ns.port))
    sock.listen(1024)
    config = uvicorn.Config(
        create_app(),
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
        lifespan="off",
    )
    # The socket is listening already: connections made from now on wait in its backlog.
    print(f"fastapi-peer listening on {ns.host}:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
