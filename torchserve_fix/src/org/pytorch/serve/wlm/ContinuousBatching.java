package org.pytorch.serve.wlm;

import java.lang.reflect.Field;
import java.util.Map;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.LinkedBlockingDeque;
import org.pytorch.serve.job.Job;
import org.pytorch.serve.util.messages.BaseModelRequest;
import org.pytorch.serve.util.messages.ModelInferenceRequest;
import org.pytorch.serve.util.messages.ModelLoadModelRequest;
import org.pytorch.serve.util.messages.ModelWorkerResponse;
import org.pytorch.serve.util.messages.Predictions;
import org.pytorch.serve.util.messages.RequestInput;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * llama-chat-torchserve's ContinuousBatching for TorchServe 0.12.0 (issue #16), loaded instead of
 * the one in model-server.jar by torchserve_fix's agent.
 *
 * <p>TorchServe's own class takes new jobs through {@code Model.pollInferJob(jobs, n)}, which holds
 * the model-wide lock, and a worker with nothing in flight waits for its first job inside that lock.
 * A worker with chats in flight needs the same lock before each step, so with two workers on a model
 * the busy one stops generating until a new request wakes the idle one.
 *
 * <p>Here no worker takes that lock: every worker takes jobs straight from the model's queue with
 * the lock-free {@code Model.pollInferJob(jobs, n, queue)}. A worker with chats in flight takes what
 * is queued without waiting and steps on; an idle worker waits for its first job (several idle
 * workers wait side by side, and a burst of requests is shared between them). The rest (requests to
 * the worker, responses, streams, errors) behaves as in TorchServe 0.12.0.
 */
public class ContinuousBatching extends BatchAggregator {
    private static final Logger logger = LoggerFactory.getLogger(ContinuousBatching.class);

    /** The model's shared request queue (Model keeps it in a private map, created once). */
    private final LinkedBlockingDeque<Job> requestQueue;

    public ContinuousBatching(Model model) {
        super(model);
        requestQueue = requestQueueOf(model);
        logger.info(
                "torchserve_fix: continuous batching for {} {} takes new jobs without the model lock",
                model.getModelName(),
                model.getVersion());
    }

    @SuppressWarnings("unchecked")
    private static LinkedBlockingDeque<Job> requestQueueOf(Model model) {
        try {
            Field field = Model.class.getDeclaredField("jobsDb");
            field.setAccessible(true);
            Map<String, LinkedBlockingDeque<Job>> queues =
                    (Map<String, LinkedBlockingDeque<Job>>) field.get(model);
            LinkedBlockingDeque<Job> queue = queues.get(Model.DEFAULT_DATA_QUEUE);
            if (queue == null) {
                throw new IllegalStateException("the model has no " + Model.DEFAULT_DATA_QUEUE);
            }
            return queue;
        } catch (ReflectiveOperationException | ClassCastException e) {
            throw new IllegalStateException(
                    "torchserve_fix was written for TorchServe 0.12.0's Model.jobsDb", e);
        }
    }

    @Override
    public BaseModelRequest getRequest(String threadName, WorkerState state)
            throws InterruptedException, ExecutionException {
        takeJobs(threadName, state, model.getBatchSize() - jobs.size());
        ModelInferenceRequest request = new ModelInferenceRequest(model.getModelName());
        if (model.isUseJobTicket() && jobs.isEmpty()) {
            model.decNumJobTickets();
            return request;
        }
        for (Job job : jobs.values()) {
            if (job.isControlCmd()) {
                if (jobs.size() > 1) {
                    throw new IllegalStateException(
                            "a control command must be sent alone, but "
                                    + jobs.size()
                                    + " jobs were taken");
                }
                String gpu = job.getPayload().getStringParameter("gpu");
                return new ModelLoadModelRequest(model, gpu == null ? -1 : Integer.parseInt(gpu));
            }
            request.setCommand(job.getCmd());
            job.setScheduled();
            request.addRequest(job.getPayload());
        }
        return request;
    }

    /** Adds up to {@code freeSlots} new jobs to {@code jobs}; waits only when it is empty. */
    private void takeJobs(String threadName, WorkerState state, int freeSlots)
            throws InterruptedException {
        boolean loaded = state == WorkerState.WORKER_MODEL_LOADED;
        if (jobs.isEmpty() && model.pollMgmtJob(threadName, loaded ? 0 : Long.MAX_VALUE, jobs)) {
            return; // a control command (load, unload) for this worker
        }
        if (!loaded) {
            return;
        }
        if (model.isUseJobTicket()) {
            model.incNumJobTickets(); // as Model.pollInferJob(jobs, n) counts a ticket per poll
        }
        if (jobs.isEmpty() || freeSlots > 0) {
            // Empty: blocks until a request comes, then gathers more for maxBatchDelay.
            // Busy: takes only what is queued now, so the chats in flight step on at once.
            model.pollInferJob(jobs, freeSlots, requestQueue);
        }
    }

    /**
     * Hands a step's results to the clients. A job stays with this worker while its handler marks it
     * unfinished (header ts_stream_next "true") and its client is still connected.
     *
     * @return always true: with continuous batching every step is answered by one message
     */
    @Override
    public boolean sendResponse(ModelWorkerResponse message) {
        if (message.getCode() != 200) {
            failAll(message.getCode(), message.getMessage());
            return true;
        }
        if (message.getPredictions().isEmpty() && hasControlCommand()) {
            cleanJobs(); // the answer to a load or unload
            return true;
        }
        for (Predictions prediction : message.getPredictions()) {
            String jobId = prediction.getRequestId();
            Job job = jobs.get(jobId);
            if (job == null) {
                throw new IllegalStateException("the worker answered a job it does not hold: " + jobId);
            }
            if (clientWaits(job)) {
                job.response(
                        prediction.getResp(),
                        prediction.getContentType(),
                        prediction.getStatusCode(),
                        prediction.getReasonPhrase(),
                        prediction.getHeaders());
            } else {
                logger.warn("Drop response for inference request {} due to client timeout", jobId);
            }
            String next = prediction.getHeaders().get(RequestInput.TS_STREAM_NEXT);
            if (next == null || next.equals("false")) {
                jobs.remove(jobId);
            } else if (!job.isOpen()) {
                jobs.remove(jobId);
                logger.info("Connection to client got closed; Removing job: {}", jobId);
            } else {
                job.getPayload().setCachedInBackend(true);
            }
        }
        return true;
    }

    private boolean hasControlCommand() {
        for (Job job : jobs.values()) {
            if (job.isControlCmd()) {
                return true;
            }
        }
        return false;
    }

    private static boolean clientWaits(Job job) {
        return job.getPayload().getClientExpireTS() > System.currentTimeMillis();
    }

    private void failAll(int status, String error) {
        for (Job job : jobs.values()) {
            if (clientWaits(job)) {
                job.sendError(status, error);
            } else {
                logger.warn("Drop error response for inference request {} due to client timeout",
                        job.getJobId());
            }
        }
        cleanJobs();
    }
}
