"""AAPO's reference-server request, sent before the policy generates and collected when the advantages need it.

With ``reference_source="vllm_server"`` the reference samples depend on the step's prompts only, not on the
policy's completions, so :class:`aapo_trl.reference.VLLMServerReference` can ask for them as soon as TRL has
tokenized the prompts (``AAPOTrainer._tokenize_prompts``, before the policy generates); the server answers while
the policy generates and is scored, and the reference then costs ``max(0, reference time - policy generation and
scoring time)`` instead of its whole time (``AAPOConfig.reference_request_overlap``).

What changes is *when*, not *what*: the request is the one TRL's ``VLLMGeneration.generate`` sends in server mode
(the prompts of every process gathered to the main process, one ``VLLMClient.generate`` call with ``n =
num_generations`` per unique prompt, the same sampling parameters; see :func:`server_request_kwargs`), and each
process gets its own slice of the answer, as before. The collectives stay on the training thread, in the same order
on every process: the prompts are gathered when the request is sent, the answer (or the error) is broadcast when it
is collected. Only the HTTP call runs in a background thread, on the main process.

Failures never hang training: every HTTP call to the reference server has a read time-out
(``reference_request_timeout``, see :func:`bound_request_time`), the training thread waits at most until that
deadline, and a server error or time-out is raised on every process as a :class:`ReferenceServerError` naming the
server and the setting.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeout

from accelerate.utils import broadcast_object_list, gather_object

TIMEOUT_SETTING = "reference_request_timeout"


class ReferenceServerError(RuntimeError):
    """The reference vLLM server failed to answer a reference request."""


class ReferenceServerTimeout(ReferenceServerError, TimeoutError):
    """The reference vLLM server did not answer a reference request within ``reference_request_timeout``."""


def server_request_kwargs(generation, num_generations: int) -> dict:
    """The keyword arguments TRL 1.16's ``VLLMGeneration.generate`` (server mode) passes to ``VLLMClient.generate``.

    ``test_reference_overlap`` checks that the overlapped and the sequential paths send identical requests.
    """
    return {
        "n": num_generations,
        "repetition_penalty": generation.repetition_penalty,
        "temperature": generation.temperature,
        "top_p": generation.top_p,
        "top_k": generation.top_k,
        "min_p": 0.0 if generation.min_p is None else generation.min_p,
        "max_tokens": generation.max_completion_length,
        "logprobs": generation.logprobs,
        "structured_outputs_regex": generation.structured_outputs_regex,
        "generation_kwargs": generation.generation_kwargs,
    }


def bound_request_time(session, timeout: float) -> None:
    """Give every HTTP call of ``session`` (a ``VLLMClient``'s) a read time-out of ``timeout`` seconds.

    ``VLLMClient`` sends its requests without a time-out, so a server that accepts a request and never answers would
    block forever. TRL's retry policy is kept (connection errors, 500/502/503), except that a read time-out is not
    retried: the time-out is the whole budget of an answer.
    """
    from requests.adapters import HTTPAdapter

    # requests has no session-wide time-out: a transport adapter that fills in each send's ``timeout`` is requests'
    # own way to give every call of a session one, and VLLMClient's sends go through its mounted adapters.
    class DeadlineAdapter(HTTPAdapter):
        def send(self, request, stream=False, timeout=None, **kwargs):
            return super().send(request, stream=stream, timeout=bound if timeout is None else timeout, **kwargs)

    bound = timeout
    for prefix in ("http://", "https://"):
        current = session.adapters[prefix]
        session.mount(prefix, DeadlineAdapter(
            pool_connections=current._pool_connections,
            pool_maxsize=current._pool_maxsize,
            pool_block=current._pool_block,
            max_retries=current.max_retries.new(read=False),  # False: re-raised as is, a requests.ReadTimeout
        ))


def reference_server_error(url: str, timeout: float, error: BaseException, waited: float | None = None):
    """The clear error for a failed reference request: a :class:`ReferenceServerTimeout` for any time-out."""
    if _is_timeout(error):
        waited_text = "" if waited is None else f" (waited {waited:.1f} s)"
        return ReferenceServerTimeout(
            f"The reference vLLM server at {url} did not answer the reference request within "
            f"{TIMEOUT_SETTING}={timeout:g} s{waited_text}. Check that the server is up and not overloaded, or raise "
            f"{TIMEOUT_SETTING}."
        )
    return ReferenceServerError(
        f"The reference vLLM server at {url} failed to answer the reference request "
        f"({TIMEOUT_SETTING}={timeout:g} s): {type(error).__name__}: {error}"
    )


def _is_timeout(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is a time-out (requests wraps some in ConnectionError)."""
    import requests
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (requests.Timeout, TimeoutError, FutureTimeout, Urllib3Timeout)):
            return True
        reason = getattr(error.args[0], "reason", None) if error.args else None  # urllib3's MaxRetryError
        error = reason if isinstance(reason, BaseException) else error.__cause__
    return False


class PendingReferenceRequest:
    """A reference request on its way: the answer is collected, on every process, by :meth:`completions`."""

    def __init__(self, sender: "BackgroundReferenceRequests", prompt_ids: list[list[int]], future: Future | None):
        self.sender = sender
        self.prompt_ids = prompt_ids  # this process's rows, as sent
        self.future = future  # main process only
        self.sent_at = time.monotonic()

    def completions(self, accelerator, prompt_ids: list[list[int]]) -> list[list[int]]:
        """This process's reference completions, one per row of ``prompt_ids`` (the rows the policy generated for).

        Collective: every process calls it once per request. The main process waits until the answer comes or the
        deadline (``sent_at + reference_request_timeout``) passes, then broadcasts the answer or the error.
        """
        outcome = self._main_process_outcome() if accelerator.is_main_process else None
        failed = isinstance(outcome, BaseException)
        shared = [(type(outcome).__name__, str(outcome)) if failed else outcome]
        broadcast_object_list(shared, from_process=0)
        if failed:
            raise outcome  # its __cause__ is the original error
        (payload,) = shared
        if isinstance(payload, tuple):  # the main process's failure, raised on this process too
            kind, message = payload
            raise (ReferenceServerTimeout if kind == ReferenceServerTimeout.__name__ else ReferenceServerError)(message)
        if prompt_ids != self.prompt_ids:  # after the collective, so that no process is left waiting in it
            raise RuntimeError(
                "The overlapped reference request was sent for other prompts than the ones the policy generated for; "
                "set reference_request_overlap=False and report this (aapo-trl is pinned to trl==1.16.0)."
            )
        start = accelerator.process_index * len(prompt_ids)
        return [list(ids) for ids in payload[start : start + len(prompt_ids)]]

    def _main_process_outcome(self) -> list[list[int]] | BaseException:
        """Every process's completions in gathered order, or the error to raise everywhere."""
        sender = self.sender
        remaining = self.sent_at + sender.timeout - time.monotonic()
        try:
            answer = self.future.result(timeout=max(remaining, 0.0))
        except Exception as error:  # noqa: BLE001 - every failure becomes one clear error on every process
            self.future.cancel()
            failure = reference_server_error(sender.url, sender.timeout, error, time.monotonic() - self.sent_at)
            failure.__cause__ = error
            return failure
        return answer["completion_ids"]


class BackgroundReferenceRequests:
    """Sends reference requests to the reference server from a background thread (main process only).

    One daemon thread per request, one request on the client's HTTP session at a time. A thread ends when its request
    does, which the read time-out bounds; :meth:`close` (at the end of ``train``, also on an exception) cancels what
    has not started, and a daemon thread never holds up the interpreter's exit.
    """

    def __init__(self, generation, url: str, timeout: float):
        self.generation = generation  # TRL's VLLMGeneration for the reference server (its vllm_client: main process)
        self.url, self.timeout = url, timeout
        self._session_lock = threading.Lock()
        self._futures: list[Future] = []

    def send(self, accelerator, prompt_ids: list[list[int]], num_generations: int) -> PendingReferenceRequest:
        """Ask the reference server for ``num_generations`` completions of every unique prompt of every process.

        Collective (the prompts are gathered to the main process); returns at once.
        """
        prompt_ids = [[int(token) for token in ids] for ids in prompt_ids]
        all_prompt_ids = gather_object(prompt_ids)
        future = None
        if accelerator.is_main_process:
            kwargs = server_request_kwargs(self.generation, num_generations)
            unique_prompt_ids = all_prompt_ids[::num_generations]  # TRL's rows repeat each prompt num_generations times
            client = self.generation.vllm_client
            future = self._in_background(lambda: client.generate(prompts=unique_prompt_ids, **kwargs))
        return PendingReferenceRequest(self, prompt_ids, future)

    def _in_background(self, call) -> Future:
        future: Future = Future()

        def run():
            with self._session_lock:
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    future.set_result(call())
                except BaseException as error:  # noqa: BLE001 - handed to the training thread
                    future.set_exception(error)

        self._futures = [f for f in self._futures if not f.done()] + [future]
        threading.Thread(target=run, name="aapo-reference-request", daemon=True).start()
        return future

    def wait_idle(self) -> None:
        """Wait until no request is on the wire (before a weight push into the server: ``ref_update_steps``)."""
        wait(self._futures, timeout=self.timeout)

    def close(self) -> None:
        for future in self._futures:
            future.cancel()  # a request already on the wire ends when the server answers or at its read time-out
        self._futures = []


__all__ = [
    "BackgroundReferenceRequests",
    "PendingReferenceRequest",
    "ReferenceServerError",
    "ReferenceServerTimeout",
    "bound_request_time",
    "reference_server_error",
    "server_request_kwargs",
]
