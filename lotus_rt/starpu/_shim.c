/* lotus_rt's C side of the StarPU binding.
 *
 * Python never touches StarPU structs: it calls the small lotus_* functions below, whose
 * signatures stay the same across StarPU 1.3 and 1.4 (cffi API mode compiles this file
 * against whichever headers pkg-config found, so struct layouts are the compiler's problem).
 *
 * How a task flows:
 *   lotus_submit()      creates a starpu_task for a lotus_codelet, attaches a lotus_rec
 *                       (task id, perf-model footprint, completion flag, reference count 2),
 *                       and submits it with StarPU's implicit data dependencies.
 *   lotus_cpu_func()    runs on a StarPU CPU worker; it collects the data pointers of the
 *   lotus_cuda_func()   task's buffers (vector interface) and calls the Python entry point
 *                       lotus_py_exec(id, ptrs, n, kind, worker, stream) (cffi takes the GIL).
 *                       After the body returns, the rec is marked done and waiting futures
 *                       are woken (before StarPU releases the task's data to successors).
 *   lotus_task_done()   StarPU's completion callback, pure C: appends a trace record,
 *                       drops the task's reference and, when it was the last outstanding
 *                       task, pauses the idle workers (see "idle pause").
 *   lotus_rec_release() drops Python's reference; the rec is freed when both are gone.
 *
 * Step plans (replay): lotus_plan_add() builds a task like lotus_submit() but keeps it (StarPU's
 * destroy flag unset) in a lotus_plan instead of submitting it; lotus_plan_submit() then submits
 * every task of the plan in order, in one call, and again after the previous run completed
 * (a task without the destroy flag may be submitted again once it has terminated and been
 * waited for; starpu_task_clean() drops the previous run's job first). The plan
 * owns its tasks and records (persistent: the completion callback does not free them); their
 * done flags are reset at each run. lotus_plan_free() destroys them once they are idle.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <starpu.h>
#include <starpu_profiling.h>
#ifdef STARPU_USE_CUDA
#include <starpu_cuda.h>
#endif

#define LOTUS_NAME_MAX 48
#define LOTUS_KIND_CPU 0
#define LOTUS_KIND_CUDA 1
#define LOTUS_KIND_OTHER 2

typedef struct lotus_rec lotus_rec;
typedef struct lotus_codelet lotus_codelet;
typedef struct lotus_plan lotus_plan;

/* Entry point implemented in Python (extern "Python" in the cdef). */
static void lotus_py_exec(uint64_t id, void **ptrs, int n, int kind, int worker, void *stream);

struct lotus_rec {
    uint64_t id;
    uint32_t footprint;
    int nbuffers;
    int refcount;
    int done;
    int persistent;  /* owned by a lotus_plan: reused by every run, freed with the plan */
    int runs;        /* a persistent task's submissions so far */
    struct lotus_codelet *codelet;  /* what the task is made of, to rebuild it for the next run */
    int priority;
    void *handles[STARPU_NMAXBUFS];
    int modes[STARPU_NMAXBUFS];
    struct starpu_task *task;
    char name[LOTUS_NAME_MAX];
};

struct lotus_codelet {
    struct starpu_codelet cl;
    struct starpu_perfmodel model;
    char symbol[LOTUS_NAME_MAX + 8];
};

struct lotus_trace_entry {
    uint64_t id;
    int worker;
    double start_us;
    double end_us;
    char name[LOTUS_NAME_MAX];
};

static pthread_mutex_t lotus_done_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t lotus_done_cond = PTHREAD_COND_INITIALIZER;
static int lotus_waiters = 0;

static pthread_mutex_t lotus_trace_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct lotus_trace_entry *lotus_trace_ring = NULL;
static size_t lotus_trace_capacity = 0;
static uint64_t lotus_trace_written = 0;
static int lotus_trace_enabled = 0;

/* ---------------------------------------------------------------- version, policies */

static void lotus_version(int *major, int *minor, int *release)
{
    starpu_get_version(major, minor, release);
}

static int lotus_built_with_cuda(void)
{
#ifdef STARPU_USE_CUDA
    return 1;
#else
    return 0;
#endif
}

static int lotus_max_buffers(void) { return STARPU_NMAXBUFS; }

static int lotus_policy_count(void)
{
    struct starpu_sched_policy **p = starpu_sched_get_predefined_policies();
    int n = 0;
    while (p[n]) n++;
    return n;
}

static const char *lotus_policy_name(int i)
{
    return starpu_sched_get_predefined_policies()[i]->policy_name;
}

static const char *lotus_policy_description(int i)
{
    return starpu_sched_get_predefined_policies()[i]->policy_description;
}

/* ---------------------------------------------------------------- init, workers */

static int lotus_init(int enable_profiling)
{
    int ret = starpu_init(NULL);
    if (ret != 0) return ret;
    if (enable_profiling) starpu_profiling_status_set(STARPU_PROFILING_ENABLE);
    return 0;
}

static void lotus_shutdown(void) { starpu_shutdown(); }

static const char *lotus_current_policy(void)
{
    struct starpu_sched_policy *p = starpu_sched_ctx_get_sched_policy(0);
    return p && p->policy_name ? p->policy_name : "";
}

static int lotus_worker_count(void) { return (int)starpu_worker_get_count(); }

static int lotus_worker_kind(int id)
{
    switch (starpu_worker_get_type(id)) {
    case STARPU_CPU_WORKER: return LOTUS_KIND_CPU;
    case STARPU_CUDA_WORKER: return LOTUS_KIND_CUDA;
    default: return LOTUS_KIND_OTHER;
    }
}

static void lotus_worker_name(int id, char *dst, size_t maxlen)
{
    starpu_worker_get_name(id, dst, maxlen);
}

static int lotus_current_worker(void) { return starpu_worker_get_id(); }

static int lotus_worker_stats(int id, int *executed_tasks, double *executing_us)
{
    struct starpu_profiling_worker_info info;
    int ret = starpu_profiling_worker_get_info(id, &info); /* also resets the counters */
    if (ret != 0) return ret;
    *executed_tasks = info.executed_tasks;
    *executing_us = starpu_timing_timespec_to_us(&info.executing_time);
    return 0;
}

static double lotus_now_us(void) { return starpu_timing_now(); }

static int lotus_min_priority(void) { return starpu_sched_get_min_priority(); }
static int lotus_max_priority(void) { return starpu_sched_get_max_priority(); }

/* ---------------------------------------------------------------- data */

static void *lotus_register(void *ptr, size_t nelems, size_t elemsize)
{
    starpu_data_handle_t handle = NULL;
    starpu_vector_data_register(&handle, STARPU_MAIN_RAM, (uintptr_t)ptr, (uint32_t)nelems, elemsize);
    return handle;
}

/* Data with no home in main memory: StarPU allocates it where the first writer runs. */
static void *lotus_register_temporary(size_t nelems, size_t elemsize)
{
    starpu_data_handle_t handle = NULL;
    starpu_vector_data_register(&handle, -1, 0, (uint32_t)nelems, elemsize);
    return handle;
}

/* Data that already lives in CUDA device memory (a CuPy array, a torch CUDA tensor): its home
 * is the memory node of the CUDA worker driving the pointer's device, so nothing is copied at
 * registration and unregistering leaves the results there. `stream` is the producer's stream
 * from __cuda_array_interface__ (0: none given, 1: legacy default, 2: per-thread default),
 * synchronised first so that StarPU never reads data still being written. Returns NULL and
 * sets *err: -ENODEV (no CUDA support compiled in, or no CUDA worker on that device), -EINVAL
 * (not device memory), -EIO (a CUDA call failed). */
static void *lotus_register_cuda(void *ptr, size_t nelems, size_t elemsize, uintptr_t stream, int *err)
{
#ifdef STARPU_USE_CUDA
    struct cudaPointerAttributes attr;
    starpu_data_handle_t handle = NULL;
    unsigned w, nworkers = starpu_worker_get_count();
    if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) { *err = -EIO; return NULL; }
    if (attr.type != cudaMemoryTypeDevice) { *err = -EINVAL; return NULL; }
    if (stream) {
        cudaStream_t s = stream == 1 ? cudaStreamLegacy : stream == 2 ? cudaStreamPerThread : (cudaStream_t)stream;
        if (cudaStreamSynchronize(s) != cudaSuccess) { *err = -EIO; return NULL; }
    }
    for (w = 0; w < nworkers; w++) {
        if (starpu_worker_get_type((int)w) == STARPU_CUDA_WORKER && starpu_worker_get_devid((int)w) == attr.device) {
            starpu_vector_data_register(&handle, (int)starpu_worker_get_memory_node(w), (uintptr_t)ptr,
                                        (uint32_t)nelems, elemsize);
            *err = 0;
            return handle;
        }
    }
    *err = -ENODEV;
    return NULL;
#else
    (void)ptr; (void)nelems; (void)elemsize; (void)stream;
    *err = -ENODEV;
    return NULL;
#endif
}

static void lotus_unregister(void *handle) { starpu_data_unregister((starpu_data_handle_t)handle); }

/* Frees the data once the tasks already submitted on it are done; does not block. */
static void lotus_unregister_submit(void *handle) { starpu_data_unregister_submit((starpu_data_handle_t)handle); }

static int lotus_acquire(void *handle, int mode)
{
    return starpu_data_acquire((starpu_data_handle_t)handle, (enum starpu_data_access_mode)mode);
}

static void lotus_release(void *handle) { starpu_data_release((starpu_data_handle_t)handle); }

/* Acquire on the data's home node (main RAM or the GPU it was registered on): with RW, every
 * other copy is dropped (the home was written outside tasks); with R, the home is made valid
 * again (tasks wrote another copy). */
static int lotus_acquire_home(void *handle, int mode)
{
    starpu_data_handle_t h = (starpu_data_handle_t)handle;
    return starpu_data_acquire_on_node(h, starpu_data_get_home_node(h), (enum starpu_data_access_mode)mode);
}

static void lotus_release_home(void *handle)
{
    starpu_data_handle_t h = (starpu_data_handle_t)handle;
    starpu_data_release_on_node(h, starpu_data_get_home_node(h));
}

static int lotus_pin(void *ptr, size_t size) { return starpu_memory_pin(ptr, size); }
static int lotus_unpin(void *ptr, size_t size) { return starpu_memory_unpin(ptr, size); }

static int lotus_mode_r(void) { return STARPU_R; }
static int lotus_mode_w(void) { return STARPU_W; }
static int lotus_mode_rw(void) { return STARPU_RW; }

/* ---------------------------------------------------------------- codelets */

/* A task counts as done once its body has returned: StarPU releases a task's data (letting
 * its successors run) before it calls the completion callback, so marking done only there
 * would let a successor finish first. */
static void lotus_mark_done(struct lotus_rec *rec)
{
    pthread_mutex_lock(&lotus_done_mutex);
    __atomic_store_n(&rec->done, 1, __ATOMIC_RELEASE);
    if (lotus_waiters) pthread_cond_broadcast(&lotus_done_cond);
    pthread_mutex_unlock(&lotus_done_mutex);
}

static void lotus_cpu_func(void *buffers[], void *arg)
{
    struct lotus_rec *rec = (struct lotus_rec *)arg;
    void *ptrs[STARPU_NMAXBUFS];
    int i;
    for (i = 0; i < rec->nbuffers; i++) ptrs[i] = (void *)STARPU_VECTOR_GET_PTR(buffers[i]);
    lotus_py_exec(rec->id, ptrs, rec->nbuffers, LOTUS_KIND_CPU, starpu_worker_get_id(), NULL);
    lotus_mark_done(rec);
}

#ifdef STARPU_USE_CUDA
static void lotus_cuda_func(void *buffers[], void *arg)
{
    struct lotus_rec *rec = (struct lotus_rec *)arg;
    void *ptrs[STARPU_NMAXBUFS];
    int i;
    for (i = 0; i < rec->nbuffers; i++) ptrs[i] = (void *)STARPU_VECTOR_GET_PTR(buffers[i]);
    lotus_py_exec(rec->id, ptrs, rec->nbuffers, LOTUS_KIND_CUDA, starpu_worker_get_id(),
                  (void *)starpu_cuda_get_local_stream());
    lotus_mark_done(rec); /* kernels are queued on StarPU's stream, which orders successors */
}
#endif

/* The history-based model's footprint: the hash Python computed from shapes, dtypes and
 * scalar arguments, so that 64x128 and 128x64 operands are calibrated separately. */
static uint32_t lotus_footprint(struct starpu_task *task)
{
    return ((struct lotus_rec *)task->cl_arg)->footprint;
}

static struct lotus_codelet *lotus_codelet_new(const char *name, int with_cpu, int with_cuda)
{
    struct lotus_codelet *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    snprintf(c->symbol, sizeof(c->symbol), "lotus_%s", name);
    starpu_codelet_init(&c->cl);
    c->cl.where = 0;
    if (with_cpu) {
        c->cl.where |= STARPU_CPU;
        c->cl.cpu_funcs[0] = lotus_cpu_func;
    }
#ifdef STARPU_USE_CUDA
    if (with_cuda) {
        c->cl.where |= STARPU_CUDA;
        c->cl.cuda_funcs[0] = lotus_cuda_func;
        c->cl.cuda_flags[0] = STARPU_CUDA_ASYNC;
    }
#else
    (void)with_cuda;
#endif
    c->cl.nbuffers = STARPU_VARIABLE_NBUFFERS;
    c->cl.name = c->symbol;
    c->model.type = STARPU_HISTORY_BASED;
    c->model.symbol = c->symbol;
    c->model.footprint = lotus_footprint;
    c->cl.model = &c->model;
    return c;
}

static void lotus_codelet_free(struct lotus_codelet *c) { free(c); }

/* ---------------------------------------------------------------- tasks */

static void lotus_rec_release(struct lotus_rec *rec)
{
    if (__atomic_sub_fetch(&rec->refcount, 1, __ATOMIC_ACQ_REL) == 0) free(rec);
}

static void lotus_trace_push(struct lotus_rec *rec)
{
    struct starpu_profiling_task_info *info = rec->task->profiling_info;
    struct lotus_trace_entry *e;
    if (!info) return;
    pthread_mutex_lock(&lotus_trace_mutex);
    if (lotus_trace_enabled && lotus_trace_capacity) {
        e = &lotus_trace_ring[lotus_trace_written % lotus_trace_capacity];
        e->id = rec->id;
        e->worker = info->workerid;
        e->start_us = starpu_timing_timespec_to_us(&info->start_time);
        e->end_us = starpu_timing_timespec_to_us(&info->end_time);
        memcpy(e->name, rec->name, LOTUS_NAME_MAX);
        lotus_trace_written++;
    }
    pthread_mutex_unlock(&lotus_trace_mutex);
}

/* ---------------------------------------------------------------- idle pause
 *
 * This StarPU's CPU drivers poll their queues while idle (STARPU_NON_BLOCKING_DRIVERS). With
 * a worker per core, a thread that wakes up next to them (the one returning from wait_all, a
 * torch op) waits for the kernel to preempt a polling worker: 2-4 ms on 2 cores. So when
 * auto-pause is on, the completion callback of the last outstanding task pauses the workers
 * (they sleep in StarPU's _starpu_may_pause). Tasks submitted while paused are held by StarPU
 * until lotus_start_held() or lotus_wait_all() runs, or until `batch` of them are queued.
 * starpu_pause() is a plain increment, so every pause and resume goes through
 * lotus_pause_mutex. */
static pthread_mutex_t lotus_pause_mutex = PTHREAD_MUTEX_INITIALIZER;
static int lotus_autopause = 0;
static int lotus_paused = 0;
static long lotus_outstanding = 0;  /* tasks submitted through lotus_submit, not yet completed */
static long lotus_held = 0;         /* tasks submitted since the workers were paused */
static long lotus_batch = 64;
static int lotus_waiting_all = 0;   /* threads inside lotus_wait_all */

static void lotus_resume_locked(void)
{
    if (lotus_paused) {
        lotus_paused = 0;
        lotus_held = 0;
        starpu_resume();
    }
}

static void lotus_pause_locked(void)
{
    if (!lotus_paused) {
        starpu_pause();
        lotus_paused = 1;
        lotus_held = 0;
    }
}

/* enabled: pause whenever no task is outstanding (and now, if none is); off: resume for good. */
static void lotus_idle_pause_configure(int enabled, long batch)
{
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_autopause = enabled;
    lotus_batch = batch > 0 ? batch : 1;
    if (!enabled) lotus_resume_locked();
    else if (lotus_outstanding == 0) lotus_pause_locked();
    pthread_mutex_unlock(&lotus_pause_mutex);
}

/* A pause asked for by the user (the benchmarks pause the workers while a reference runs).
 * StarPU's pause is a depth counter: these nest with each other and with the idle pause. */
static int lotus_user_pauses = 0;

static void lotus_user_pause(void)
{
    pthread_mutex_lock(&lotus_pause_mutex);
    starpu_pause();
    lotus_user_pauses++;
    pthread_mutex_unlock(&lotus_pause_mutex);
}

/* Returns 0, or -1 when no user pause was held. */
static int lotus_user_resume(void)
{
    int ret = -1;
    pthread_mutex_lock(&lotus_pause_mutex);
    if (lotus_user_pauses > 0) {
        lotus_user_pauses--;
        starpu_resume();
        ret = 0;
    }
    pthread_mutex_unlock(&lotus_pause_mutex);
    return ret;
}

static int lotus_user_paused(void)
{
    int depth;
    pthread_mutex_lock(&lotus_pause_mutex);
    depth = lotus_user_pauses;
    pthread_mutex_unlock(&lotus_pause_mutex);
    return depth;
}

/* Someone waits on tasks (wait_all, a future, unregister, acquire): held tasks must run. */
static void lotus_start_held(void)
{
    pthread_mutex_lock(&lotus_pause_mutex);
    if (lotus_held) lotus_resume_locked();
    pthread_mutex_unlock(&lotus_pause_mutex);
}

/* A task submitted while another thread is inside lotus_wait_all must not be held: that
 * wait would never end. */
static void lotus_count_submit(void)
{
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_outstanding++;
    if (lotus_paused && (++lotus_held >= lotus_batch || lotus_waiting_all)) lotus_resume_locked();
    pthread_mutex_unlock(&lotus_pause_mutex);
}

static void lotus_count_done(void)
{
    pthread_mutex_lock(&lotus_pause_mutex);
    if (--lotus_outstanding == 0 && lotus_autopause) lotus_pause_locked();
    pthread_mutex_unlock(&lotus_pause_mutex);
}

static void lotus_task_done(void *arg)
{
    struct lotus_rec *rec = (struct lotus_rec *)arg;
    lotus_trace_push(rec);
    if (!rec->persistent) lotus_rec_release(rec);
    lotus_count_done();
}

static __thread int lotus_submit_error = 0;

/* The error code of this thread's last failed lotus_submit (a negative errno). */
static int lotus_last_submit_error(void) { return lotus_submit_error; }

static void lotus_fill_task(struct starpu_task *task, struct lotus_rec *rec)
{
    int i;
    task->cl = &rec->codelet->cl;
    task->nbuffers = rec->nbuffers;
    for (i = 0; i < rec->nbuffers; i++) {
        task->handles[i] = (starpu_data_handle_t)rec->handles[i];
        task->modes[i] = (enum starpu_data_access_mode)rec->modes[i];
    }
    task->cl_arg = rec;
    task->callback_func = lotus_task_done;
    task->callback_arg = rec;
    task->priority = rec->priority;
    task->name = rec->name;
}

/* A task and its record, not submitted; NULL (and lotus_submit_error set) on bad input. */
static struct lotus_rec *lotus_make_task(struct lotus_codelet *c, void **handles, int *modes, int n,
                                         int priority, const char *name, uint64_t id, uint32_t footprint)
{
    struct lotus_rec *rec;
    struct starpu_task *task;
    int i;
    if (n < 0 || n > STARPU_NMAXBUFS) { lotus_submit_error = -E2BIG; return NULL; }
    rec = calloc(1, sizeof(*rec));
    if (!rec) { lotus_submit_error = -ENOMEM; return NULL; }
    rec->id = id;
    rec->footprint = footprint;
    rec->nbuffers = n;
    rec->refcount = 2;
    strncpy(rec->name, name, LOTUS_NAME_MAX - 1);

    rec->codelet = c;
    rec->priority = priority;
    for (i = 0; i < n; i++) {
        rec->handles[i] = handles[i];
        rec->modes[i] = modes[i];
    }
    task = starpu_task_create();
    rec->task = task;
    lotus_fill_task(task, rec);
    return rec;
}

/* Returns the task's record (Python owns one reference), or NULL and sets the error
 * lotus_last_submit_error() returns. */
static struct lotus_rec *lotus_submit(struct lotus_codelet *c, void **handles, int *modes, int n,
                                      int priority, const char *name, uint64_t id,
                                      uint32_t footprint)
{
    struct lotus_rec *rec = lotus_make_task(c, handles, modes, n, priority, name, id, footprint);
    struct starpu_task *task;
    int ret;
    if (!rec) return NULL;
    task = rec->task;
    lotus_count_submit();
    ret = starpu_task_submit(task);
    if (ret != 0) {
        lotus_count_done();
        task->destroy = 0;
        starpu_task_destroy(task);
        free(rec);
        lotus_submit_error = ret;
        return NULL;
    }
    return rec;
}

/* ---------------------------------------------------------------- step plans */

struct lotus_plan {
    int n, cap;
    struct lotus_rec **recs;
};

static struct lotus_plan *lotus_plan_new(void) { return calloc(1, sizeof(struct lotus_plan)); }

static int lotus_plan_size(struct lotus_plan *p) { return p->n; }

/* Adds a task to the plan without submitting it; returns its record (owned by the plan), or
 * NULL with lotus_last_submit_error() set. */
static struct lotus_rec *lotus_plan_add(struct lotus_plan *p, struct lotus_codelet *c, void **handles, int *modes,
                                        int n, int priority, const char *name, uint64_t id, uint32_t footprint)
{
    struct lotus_rec *rec;
    if (p->n == p->cap) {
        int cap = p->cap ? 2 * p->cap : 64;
        struct lotus_rec **recs = realloc(p->recs, cap * sizeof(*recs));
        if (!recs) { lotus_submit_error = -ENOMEM; return NULL; }
        p->recs = recs;
        p->cap = cap;
    }
    rec = lotus_make_task(c, handles, modes, n, priority, name, id, footprint);
    if (!rec) return NULL;
    rec->persistent = 1;
    rec->task->destroy = 0;
    p->recs[p->n++] = rec;
    return rec;
}

/* Submits every task of the plan in order (the previous run must have completed). Returns 0,
 * or k+1 when the k-th submission failed (lotus_last_submit_error() says why; the tasks before
 * it were submitted and must be waited for). */
static int lotus_plan_submit(struct lotus_plan *p)
{
    int k, ret;
    for (k = 0; k < p->n; k++) {
        struct lotus_rec *rec = p->recs[k];
        __atomic_store_n(&rec->done, 0, __ATOMIC_RELEASE);
        if (rec->runs++) {
            /* drop the last run's job (StarPU keeps it while destroy is unset), then make the
             * task anew in the same memory: clean leaves it uninitialised */
            starpu_task_clean(rec->task);
            starpu_task_init(rec->task);
            lotus_fill_task(rec->task, rec);
        }
        lotus_count_submit();
        ret = starpu_task_submit(rec->task);
        if (ret != 0) {
            lotus_count_done();
            lotus_submit_error = ret;
            return k + 1;
        }
    }
    return 0;
}

/* Frees the plan's tasks and records; only once none of them is running or queued. */
static void lotus_plan_free(struct lotus_plan *p)
{
    int k;
    for (k = 0; k < p->n; k++) {
        starpu_task_destroy(p->recs[k]->task);
        free(p->recs[k]);
    }
    free(p->recs);
    free(p);
}

static int lotus_rec_done(struct lotus_rec *rec) { return __atomic_load_n(&rec->done, __ATOMIC_ACQUIRE); }

/* Wait for one task; timeout_s < 0 waits forever. Returns 1 when done, 0 on timeout. */
static int lotus_rec_wait(struct lotus_rec *rec, double timeout_s)
{
    struct timespec deadline;
    int done;
    if (timeout_s >= 0) {
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += (time_t)timeout_s;
        deadline.tv_nsec += (long)((timeout_s - (double)(time_t)timeout_s) * 1e9);
        if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    }
    pthread_mutex_lock(&lotus_done_mutex);
    lotus_waiters++;
    while (!(done = __atomic_load_n(&rec->done, __ATOMIC_ACQUIRE))) {
        if (timeout_s < 0) pthread_cond_wait(&lotus_done_cond, &lotus_done_mutex);
        else if (pthread_cond_timedwait(&lotus_done_cond, &lotus_done_mutex, &deadline) == ETIMEDOUT) {
            done = __atomic_load_n(&rec->done, __ATOMIC_ACQUIRE);
            break;
        }
    }
    lotus_waiters--;
    pthread_mutex_unlock(&lotus_done_mutex);
    return done;
}

static int lotus_wait_all(void)
{
    int ret;
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_waiting_all++;
    if (lotus_held) lotus_resume_locked();
    pthread_mutex_unlock(&lotus_pause_mutex);
    ret = starpu_task_wait_for_all();
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_waiting_all--;
    pthread_mutex_unlock(&lotus_pause_mutex);
    return ret;
}

/* ---------------------------------------------------------------- trace ring */

static int lotus_trace_configure(int enabled, size_t capacity)
{
    struct lotus_trace_entry *ring = NULL;
    if (capacity) {
        ring = calloc(capacity, sizeof(*ring));
        if (!ring) return -ENOMEM;
    }
    pthread_mutex_lock(&lotus_trace_mutex);
    free(lotus_trace_ring);
    lotus_trace_ring = ring;
    lotus_trace_capacity = capacity;
    lotus_trace_written = 0;
    lotus_trace_enabled = enabled;
    pthread_mutex_unlock(&lotus_trace_mutex);
    return 0;
}

/* Copies the retained entries, oldest first; returns how many tasks were recorded in all
 * (more than copied when the ring wrapped). */
static uint64_t lotus_trace_read(struct lotus_trace_entry *out, size_t max, size_t *copied)
{
    uint64_t written, first, k;
    size_t n = 0;
    pthread_mutex_lock(&lotus_trace_mutex);
    written = lotus_trace_written;
    first = written > lotus_trace_capacity ? written - lotus_trace_capacity : 0;
    for (k = first; k < written && n < max; k++, n++)
        out[n] = lotus_trace_ring[k % lotus_trace_capacity];
    pthread_mutex_unlock(&lotus_trace_mutex);
    *copied = n;
    return written;
}

static void lotus_trace_clear(void)
{
    pthread_mutex_lock(&lotus_trace_mutex);
    lotus_trace_written = 0;
    pthread_mutex_unlock(&lotus_trace_mutex);
}

#ifdef LOTUS_WITH_MPI
#include "_mpi_shim.c"  /* StarPU-MPI: ranks, owner-computes tasks, reductions (see that file) */
#endif
