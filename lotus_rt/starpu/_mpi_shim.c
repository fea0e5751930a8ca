/* lotus_rt's StarPU-MPI side: compiled into the binding only when _build.py found starpumpi and
 * the MPI compiler flags (it defines LOTUS_WITH_MPI and _shim.c includes this file at its end,
 * so the static helpers there, lotus_make_task and the idle-pause counters, are in scope).
 *
 * Model (StarPU-MPI's): every rank registers every piece of data with the same tag and the same
 * owner rank, and every rank submits the same tasks in the same order. starpu_mpi_task_build()
 * then decides, on each rank, which rank runs a task (the owner of the data it writes; or the
 * rank given by execute_on) and posts the sends and receives of the data it reads; only that
 * rank gets a task, which lotus_mpi_submit() builds with lotus_make_task() (same lotus_rec,
 * same lotus_py_exec body, same completion callback as lotus_submit) and submits.
 * starpu_mpi_task_post_build() then sends written data back to owners that did not run it.
 *
 * Waiting. StarPU-MPI's wait/barrier/redux call starpu_task_wait_for_all() inside; the idle
 * pause of _shim.c holds tasks while the workers are paused, so each of those calls runs as a
 * "waiter" (lotus_waiting_all), and redux, which submits tasks of its own that lotus does not
 * count, keeps one outstanding count for its whole duration so the workers never pause inside.
 *
 * StarPU-MPI 1.3.10's barrier (starpu_mpi_barrier, starpu_mpi_wait_for_all, starpu_mpi_shutdown)
 * waits for the requests it counts, then blocks its progression thread in MPI_Barrier; a detached
 * receive still waiting for its envelope is not counted. If its data is above the eager limit,
 * the sender's rendezvous can only complete once the receiver posts MPI_Irecv, which its
 * progression thread never does from inside MPI_Barrier: both ranks hang (seen here with
 * starpu_mpi_get_data_on_all_nodes_detached + starpu_mpi_wait_for_all of 200 KB and more, in
 * plain C too). So the binding exposes no bare receive: every transfer it starts is consumed by a
 * task (lotus_mpi_submit), and waiting for this rank's tasks (done before each barrier) then
 * waits for its receives.
 *
 * Reductions. lotus_mpi_set_redux_sum() gives a handle C init (zero) and redux (dst += src)
 * codelets for its dtype, so that tasks may access it in STARPU_REDUX mode and
 * starpu_mpi_redux_data() can sum every rank's contribution on the owner. StarPU 1.3's
 * starpu_mpi_redux_data() ends with starpu_task_wait_for_all(): it blocks the submitting thread.
 */
#include <mpi.h>
#include <starpu_mpi.h>

#define LOTUS_MPI_NOT_STARTED (-1000)
#define LOTUS_MPI_FINALIZED (-1001)

static MPI_Comm lotus_mpi_comm;
static int lotus_mpi_started = 0;
static int lotus_mpi_me = -1, lotus_mpi_nranks = 0;  /* asked of MPI once, at init */

static int lotus_mpi_initialized(void)
{
    int flag = 0;
    MPI_Initialized(&flag);
    return flag;
}

static int lotus_mpi_finalized(void)
{
    int flag = 0;
    MPI_Finalized(&flag);
    return flag;
}

/* comm: NULL for MPI_COMM_WORLD, else the address of an MPI_Comm (mpi4py's MPI._addressof).
 * StarPU must already run (lotus_init). MPI is initialised here (MPI_THREAD_SERIALIZED, by
 * StarPU-MPI's progression thread) unless the program did it already. */
static int lotus_mpi_init(void *comm, int *rank, int *size)
{
    int ret;
    if (lotus_mpi_started) return -EALREADY;
    if (lotus_mpi_finalized()) return LOTUS_MPI_FINALIZED;
    lotus_mpi_comm = comm ? *(MPI_Comm *)comm : MPI_COMM_WORLD;
    if (comm && !lotus_mpi_initialized()) return -EINVAL;  /* a communicator needs MPI running */
    ret = starpu_mpi_init_comm(NULL, NULL, !lotus_mpi_initialized(), lotus_mpi_comm);
    if (ret != 0) return ret;
    starpu_mpi_comm_rank(lotus_mpi_comm, &lotus_mpi_me);
    starpu_mpi_comm_size(lotus_mpi_comm, &lotus_mpi_nranks);
    *rank = lotus_mpi_me;
    *size = lotus_mpi_nranks;
    lotus_mpi_started = 1;
    return 0;
}

/* Waits for every task and message (collective over MPI_COMM_WORLD), stops StarPU-MPI and,
 * when StarPU-MPI initialised MPI, finalises it. StarPU itself keeps running. */
static int lotus_mpi_shutdown(void)
{
    if (!lotus_mpi_started) return LOTUS_MPI_NOT_STARTED;
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_waiting_all++;
    if (lotus_held) lotus_resume_locked();
    pthread_mutex_unlock(&lotus_pause_mutex);
    starpu_mpi_shutdown();
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_waiting_all--;
    pthread_mutex_unlock(&lotus_pause_mutex);
    lotus_mpi_started = 0;
    return 0;
}

static int lotus_mpi_rank(void) { return lotus_mpi_started ? lotus_mpi_me : -1; }
static int lotus_mpi_size(void) { return lotus_mpi_started ? lotus_mpi_nranks : 0; }

static int lotus_mode_redux(void) { return STARPU_REDUX; }

/* ---------------------------------------------------------------- data */

static void lotus_mpi_data_register(void *handle, int64_t tag, int owner)
{
    starpu_mpi_data_register_comm((starpu_data_handle_t)handle, (starpu_mpi_tag_t)tag, owner, lotus_mpi_comm);
}

static int lotus_mpi_data_owner(void *handle) { return starpu_mpi_data_get_rank((starpu_data_handle_t)handle); }
static int64_t lotus_mpi_data_tag(void *handle) { return (int64_t)starpu_mpi_data_get_tag((starpu_data_handle_t)handle); }

/* Forget the copies of this data received or sent by earlier tasks (collective). */
static void lotus_mpi_cache_flush(void *handle) { starpu_mpi_cache_flush(lotus_mpi_comm, (starpu_data_handle_t)handle); }

/* ---------------------------------------------------------------- sum reductions */

#define LOTUS_SUM_KERNELS(SUFFIX, TYPE)                                                  \
    static void lotus_init_##SUFFIX(void *buffers[], void *arg)                          \
    {                                                                                    \
        (void)arg;                                                                       \
        memset((void *)STARPU_VECTOR_GET_PTR(buffers[0]), 0,                             \
               STARPU_VECTOR_GET_NX(buffers[0]) * STARPU_VECTOR_GET_ELEMSIZE(buffers[0])); \
    }                                                                                    \
    static void lotus_redux_##SUFFIX(void *buffers[], void *arg)                         \
    {                                                                                    \
        TYPE *dst = (TYPE *)STARPU_VECTOR_GET_PTR(buffers[0]);                           \
        const TYPE *src = (const TYPE *)STARPU_VECTOR_GET_PTR(buffers[1]);               \
        size_t i, n = STARPU_VECTOR_GET_NX(buffers[0]);                                  \
        (void)arg;                                                                       \
        for (i = 0; i < n; i++) dst[i] += src[i];                                        \
    }

LOTUS_SUM_KERNELS(f64, double)
LOTUS_SUM_KERNELS(f32, float)
LOTUS_SUM_KERNELS(i64, int64_t)
LOTUS_SUM_KERNELS(i32, int32_t)

static struct starpu_codelet lotus_init_cl[4], lotus_redux_cl[4];
static int lotus_redux_ready = 0;

static void lotus_redux_codelets(void)
{
    static starpu_cpu_func_t inits[4] = {lotus_init_f64, lotus_init_f32, lotus_init_i64, lotus_init_i32};
    static starpu_cpu_func_t reduxes[4] = {lotus_redux_f64, lotus_redux_f32, lotus_redux_i64, lotus_redux_i32};
    int k;
    if (lotus_redux_ready) return;
    for (k = 0; k < 4; k++) {
        starpu_codelet_init(&lotus_init_cl[k]);
        lotus_init_cl[k].cpu_funcs[0] = inits[k];
        lotus_init_cl[k].nbuffers = 1;
        lotus_init_cl[k].modes[0] = STARPU_W;
        lotus_init_cl[k].name = "lotus_redux_init";
        starpu_codelet_init(&lotus_redux_cl[k]);
        lotus_redux_cl[k].cpu_funcs[0] = reduxes[k];
        lotus_redux_cl[k].nbuffers = 2;
        lotus_redux_cl[k].modes[0] = STARPU_RW;  /* StarPU 1.3 asserts exactly RW */
        lotus_redux_cl[k].modes[1] = STARPU_R;
        lotus_redux_cl[k].name = "lotus_redux_sum";
    }
    lotus_redux_ready = 1;
}

/* dtype: 0 float64, 1 float32, 2 int64, 3 int32. Returns 0, or -EINVAL. */
static int lotus_mpi_set_redux_sum(void *handle, int dtype)
{
    if (dtype < 0 || dtype > 3) return -EINVAL;
    lotus_redux_codelets();
    starpu_data_set_reduction_methods((starpu_data_handle_t)handle, &lotus_redux_cl[dtype], &lotus_init_cl[dtype]);
    return 0;
}

/* starpu_mpi_redux_data: every rank sends its contribution to the owner, which sums them. It
 * waits for all tasks before returning (StarPU 1.3), so it runs as a waiter. */
static void lotus_mpi_redux(void *handle, int priority)
{
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_outstanding++;  /* its own tasks are not counted: no idle pause until it returns */
    lotus_waiting_all++;
    lotus_resume_locked();
    pthread_mutex_unlock(&lotus_pause_mutex);
    starpu_mpi_redux_data_prio(lotus_mpi_comm, (starpu_data_handle_t)handle, priority);
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_waiting_all--;
    pthread_mutex_unlock(&lotus_pause_mutex);
    lotus_count_done();
}

/* ---------------------------------------------------------------- tasks */

/* The idle pause counts a task submitted here only once it is ready (StarPU calls a task's
 * prologue callback when its dependencies, data received from other ranks included, are met,
 * just before pushing it): while a rank only waits for messages, no task of it is outstanding,
 * so its workers are paused instead of polling beside the ranks that compute (on 2 cores, 2
 * ranks). The ready task is then counted like one just submitted: it resumes the workers at
 * once when a thread waits (a wait, a barrier), else after START_BATCH ready tasks or the next
 * wait. Its completion callback (lotus_task_done) uncounts it as usual. */
static void lotus_count_when_ready(void *arg)
{
    (void)arg;
    lotus_count_submit();
}

/* A counted no-op task reading `handle`: on an owner that did not run a task writing its data,
 * it orders this rank's task wait after the receive of the result (see the barrier note above). */
static void lotus_noop(void *buffers[], void *arg) { (void)buffers; (void)arg; }
static struct starpu_codelet lotus_touch_cl;
static int lotus_touch_ready = 0;

static void lotus_touch_done(void *arg) { (void)arg; lotus_count_done(); }

static void lotus_touch(starpu_data_handle_t handle)
{
    struct starpu_task *task;
    if (!lotus_touch_ready) {
        starpu_codelet_init(&lotus_touch_cl);
        lotus_touch_cl.cpu_funcs[0] = lotus_noop;
        lotus_touch_cl.nbuffers = 1;
        lotus_touch_cl.modes[0] = STARPU_R;
        lotus_touch_cl.name = "lotus_mpi_receive";
        lotus_touch_ready = 1;
    }
    task = starpu_task_create();
    task->cl = &lotus_touch_cl;
    task->handles[0] = handle;
    task->callback_func = lotus_touch_done;
    task->prologue_callback_func = lotus_count_when_ready;  /* counted once received */
    if (starpu_task_submit(task) != 0)  /* cannot fail for a CPU no-op; if it did, nothing was counted */
        return;
}

/* Owner-computes insertion (starpu_mpi_task_build / submit / starpu_mpi_task_post_build).
 * execute_on >= 0 names the rank that runs the task; -1 lets StarPU-MPI pick the owner of the
 * written data. Returns the task's record when this rank runs it (*executed = 1), NULL with
 * *executed = 0 when another rank does, NULL with *executed = -1 and lotus_last_submit_error()
 * set on failure. Every handle must carry an owner and a tag (lotus_mpi_data_register). */
static struct lotus_rec *lotus_mpi_submit(struct lotus_codelet *c, void **handles, int *modes, int n,
                                          int priority, const char *name, uint64_t id, uint32_t footprint,
                                          int execute_on, int *executed)
{
    struct starpu_data_descr descrs[STARPU_NMAXBUFS];
    struct starpu_task *built;
    struct lotus_rec *rec = NULL;
    int i, ret;
    *executed = -1;
    if (!lotus_mpi_started) { lotus_submit_error = LOTUS_MPI_NOT_STARTED; return NULL; }
    if (n < 1 || n > STARPU_NMAXBUFS) { lotus_submit_error = -E2BIG; return NULL; }
    for (i = 0; i < n; i++) {
        descrs[i].handle = (starpu_data_handle_t)handles[i];
        descrs[i].mode = (enum starpu_data_access_mode)modes[i];
    }
#define LOTUS_MPI_ARGS STARPU_DATA_MODE_ARRAY, descrs, n, STARPU_PRIORITY, priority
    if (execute_on >= 0)
        built = starpu_mpi_task_build(lotus_mpi_comm, &c->cl, LOTUS_MPI_ARGS, STARPU_EXECUTE_ON_NODE, execute_on, 0);
    else
        built = starpu_mpi_task_build(lotus_mpi_comm, &c->cl, LOTUS_MPI_ARGS, 0);
    *executed = 0;
    if (built) {
        /* the receives this task needs are posted; run our own task in its place */
        built->destroy = 0;
        starpu_task_destroy(built);
        rec = lotus_make_task(c, handles, modes, n, priority, name, id, footprint);
        if (!rec) {
            *executed = -1;
        } else {
            rec->task->prologue_callback_func = lotus_count_when_ready;
            ret = starpu_task_submit(rec->task);
            if (ret != 0) {
                rec->task->destroy = 0;
                starpu_task_destroy(rec->task);
                free(rec);
                rec = NULL;
                lotus_submit_error = ret;
                *executed = -1;
            } else {
                *executed = 1;
            }
        }
    }
    /* on every rank, even after a failure here: the other ranks expect its messages */
    if (execute_on >= 0)
        starpu_mpi_task_post_build(lotus_mpi_comm, &c->cl, LOTUS_MPI_ARGS, STARPU_EXECUTE_ON_NODE, execute_on, 0);
    else
        starpu_mpi_task_post_build(lotus_mpi_comm, &c->cl, LOTUS_MPI_ARGS, 0);
#undef LOTUS_MPI_ARGS
    if (*executed == 0) {  /* data this rank owns, written elsewhere, comes back here */
        int me = lotus_mpi_rank();
        for (i = 0; i < n; i++)
            if ((modes[i] & STARPU_W) && starpu_mpi_data_get_rank(descrs[i].handle) == me)
                lotus_touch(descrs[i].handle);
    }
    return rec;
}

/* ---------------------------------------------------------------- waiting, errors */

/* Every task and message of this rank done, then a barrier (collective). */
static int lotus_mpi_wait_all(void)
{
    int ret;
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_waiting_all++;
    if (lotus_held) lotus_resume_locked();
    pthread_mutex_unlock(&lotus_pause_mutex);
    ret = starpu_mpi_wait_for_all(lotus_mpi_comm);
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_waiting_all--;
    pthread_mutex_unlock(&lotus_pause_mutex);
    return ret;
}

/* A barrier; StarPU-MPI's waits for this rank's tasks and messages first. */
static int lotus_mpi_barrier(void)
{
    int ret;
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_waiting_all++;
    if (lotus_held) lotus_resume_locked();
    pthread_mutex_unlock(&lotus_pause_mutex);
    ret = starpu_mpi_barrier(lotus_mpi_comm);
    pthread_mutex_lock(&lotus_pause_mutex);
    lotus_waiting_all--;
    pthread_mutex_unlock(&lotus_pause_mutex);
    return ret;
}

/* Ends every rank of the communicator (MPI_Abort); does not return. */
static void lotus_mpi_abort(int code)
{
    fflush(stdout);
    fflush(stderr);
    MPI_Abort(lotus_mpi_started ? lotus_mpi_comm : MPI_COMM_WORLD, code);
}
