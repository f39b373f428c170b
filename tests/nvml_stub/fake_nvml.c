/*
 * A stand-in for libnvidia-ml.so.1, so the NVML adapter can be tested on machines
 * without a GPU, and GPU failures (a lost card, an unloaded driver) can be staged
 * on demand.
 *
 * Only the symbols that pynvml resolves for the sidecar's code paths are exported.
 * Their state is re-read from the file named by FAKE_NVML_STATE_FILE on every call,
 * so a test or a simulated trainer can change it between polls of a running process.
 * Format: one key=value per line; unknown keys are ignored, a missing file or key
 * means the default, and of a key given twice the later line wins (so appending changes it).
 *
 *   count=<n>          number of devices (default 1)
 *   util=<0-100>       nvmlUtilization_t.gpu for every device (default 0)
 *   mem_used=<bytes>   default 0
 *   mem_total=<bytes>  default 24 GiB
 *   power_mw=<int>     milliwatts (default 30000); -1 means NVML_ERROR_NOT_SUPPORTED
 *   error=<none|gpu_lost|driver_not_loaded|unknown>
 *                      gpu_lost / unknown: every per-device query fails with
 *                      NVML_ERROR_GPU_IS_LOST / NVML_ERROR_UNKNOWN;
 *                      driver_not_loaded: nvmlInit fails with NVML_ERROR_DRIVER_NOT_LOADED.
 *
 *   procs=<pid>:<bytes>,<pid>:<bytes>
 *                      compute processes on every device, in this order (default: none;
 *                      an empty value means none). <pid> alone, or <pid>:unknown, reports
 *                      the memory as NVML_VALUE_NOT_AVAILABLE (as for WDDM on Windows).
 *   free_on_exit=1     drop from procs every pid that has exited (no /proc entry, or a
 *                      zombie), as the driver frees a process's memory when its CUDA
 *                      contexts go with it: a trainer that lists its own pid disappears
 *                      from the list when it is killed, with nobody editing the file.
 *   xid=<code>,<code>  XID critical-error events that have happened on every device, oldest
 *                      first. Like the driver, an event set only receives the events that
 *                      happen after a device was registered on it: registration remembers
 *                      how many are listed then, and each later one is delivered once per
 *                      registered device by nvmlEventSetWait_v2 (oldest first;
 *                      NVML_ERROR_TIMEOUT once none is pending). Append to the list to make
 *                      a new event happen. xid=unsupported: nvmlDeviceRegisterEvents answers
 *                      NVML_ERROR_NOT_SUPPORTED for XID events (as for a vGPU guest).
 *   recovery_action=<n>|unsupported
 *                      the NVML_FI_DEV_GET_GPU_RECOVERY_ACTION field (230) that
 *                      nvmlDeviceGetFieldValues reports (default 0): 0 none, 1 GPU reset,
 *                      2 node reboot, 3 drain P2P, 4 drain and reset (nvml.h's
 *                      nvmlDeviceGpuRecoveryAction_t; pynvml 13 also knows 5-7, and any
 *                      number is passed through). unsupported: that field's nvmlReturn is
 *                      NVML_ERROR_NOT_SUPPORTED, as on drivers older than 570. Any other
 *                      field id also answers NVML_ERROR_NOT_SUPPORTED.
 *
 * pynvml 13's nvmlDeviceGetComputeRunningProcesses calls the _v3 symbol; _v2 (same
 * structure) is exported too, for drivers older than 510.
 *
 * Building with -DFAKE_OMIT_<group> leaves those symbols out, to stage an older driver
 * (pynvml then raises NVMLError_FunctionNotFound): FAKE_OMIT_COMPUTE_PROCESSES_V3,
 * FAKE_OMIT_EVENTS (the event-set calls), FAKE_OMIT_FIELD_VALUES.
 *
 * Like a real lost card, a loss is sticky: once a query has answered GPU_IS_LOST,
 * queries keep failing after error=none until NVML is shut down and initialised
 * again, so a client that never re-initialises cannot recover by accident.
 *
 * Enum values and struct layouts follow nvml.h, which is what pynvml's ctypes
 * structures mirror.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999
} nvmlReturn_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

/* NVML handles are opaque pointers; ours point into a fixed table of devices. */
#define FAKE_MAX_DEVICES 64
struct nvmlDevice_st {
    unsigned int index;
};
typedef struct nvmlDevice_st *nvmlDevice_t;

static struct nvmlDevice_st fake_devices[FAKE_MAX_DEVICES];

/* Real NVML counts nvmlInit calls and wants as many nvmlShutdown calls. */
static int init_count = 0;

/* Set when a query reported the GPU lost; only a full shutdown clears it. */
static int lost_until_reinit = 0;

typedef enum { FAKE_OK, FAKE_GPU_LOST, FAKE_DRIVER_NOT_LOADED, FAKE_UNKNOWN } fake_error_t;

#define FAKE_MAX_PROCESSES 64
#define FAKE_MAX_XIDS 256
/* nvml.h: NVML_VALUE_NOT_AVAILABLE, the memory of a process NVML cannot attribute. */
#define FAKE_VALUE_NOT_AVAILABLE 0xFFFFFFFFFFFFFFFFULL

typedef struct {
    unsigned int pid;
    unsigned long long used_bytes;
} fake_process_t;

typedef struct {
    unsigned int count;
    unsigned int util;
    unsigned long long mem_used;
    unsigned long long mem_total;
    long long power_mw;
    fake_error_t error;
    unsigned int process_count;
    fake_process_t processes[FAKE_MAX_PROCESSES];
    int free_on_exit;
    unsigned int xid_count;
    unsigned long long xids[FAKE_MAX_XIDS];
    int xid_unsupported;
    int recovery_action_unsupported;
    unsigned int recovery_action;
} fake_state_t;

static void parse_processes(fake_state_t *state, char *value) {
    state->process_count = 0;
    char *rest = NULL;
    for (char *item = strtok_r(value, ",", &rest); item != NULL; item = strtok_r(NULL, ",", &rest)) {
        if (state->process_count == FAKE_MAX_PROCESSES) break;
        if (*item == '\0') continue;
        fake_process_t *process = &state->processes[state->process_count++];
        char *colon = strchr(item, ':');
        process->pid = (unsigned int)strtoul(item, NULL, 10);
        if (colon == NULL || strcmp(colon + 1, "unknown") == 0 || colon[1] == '\0')
            process->used_bytes = FAKE_VALUE_NOT_AVAILABLE;
        else
            process->used_bytes = strtoull(colon + 1, NULL, 10);
    }
}

static void parse_xids(fake_state_t *state, char *value) {
    state->xid_count = 0;
    state->xid_unsupported = strcmp(value, "unsupported") == 0;
    if (state->xid_unsupported) return;
    char *rest = NULL;
    for (char *item = strtok_r(value, ",", &rest); item != NULL; item = strtok_r(NULL, ",", &rest)) {
        if (state->xid_count == FAKE_MAX_XIDS) break;
        if (*item == '\0') continue;
        state->xids[state->xid_count++] = strtoull(item, NULL, 10);
    }
}

static fake_error_t parse_error(const char *value) {
    if (strcmp(value, "gpu_lost") == 0) return FAKE_GPU_LOST;
    if (strcmp(value, "driver_not_loaded") == 0) return FAKE_DRIVER_NOT_LOADED;
    if (strcmp(value, "unknown") == 0) return FAKE_UNKNOWN;
    return FAKE_OK;
}

static void apply_line(fake_state_t *state, char *line) {
    char *separator = strchr(line, '=');
    if (separator == NULL) return;
    *separator = '\0';
    const char *key = line;
    char *value = separator + 1;
    value[strcspn(value, " \t\r\n")] = '\0';

    if (strcmp(key, "count") == 0) {
        unsigned long count = strtoul(value, NULL, 10);
        state->count = count > FAKE_MAX_DEVICES ? FAKE_MAX_DEVICES : (unsigned int)count;
    } else if (strcmp(key, "util") == 0) {
        unsigned long util = strtoul(value, NULL, 10);
        state->util = util > 100 ? 100 : (unsigned int)util;
    } else if (strcmp(key, "mem_used") == 0) {
        state->mem_used = strtoull(value, NULL, 10);
    } else if (strcmp(key, "mem_total") == 0) {
        state->mem_total = strtoull(value, NULL, 10);
    } else if (strcmp(key, "power_mw") == 0) {
        state->power_mw = strtoll(value, NULL, 10);
    } else if (strcmp(key, "error") == 0) {
        state->error = parse_error(value);
    } else if (strcmp(key, "procs") == 0) {
        parse_processes(state, value);
    } else if (strcmp(key, "free_on_exit") == 0) {
        state->free_on_exit = strcmp(value, "1") == 0;
    } else if (strcmp(key, "xid") == 0) {
        parse_xids(state, value);
    } else if (strcmp(key, "recovery_action") == 0) {
        state->recovery_action_unsupported = strcmp(value, "unsupported") == 0;
        state->recovery_action = (unsigned int)strtoul(value, NULL, 10);
    }
}

/* Re-read on every call: the point of the fake is that the file changes under a live process. */
static fake_state_t read_state(void) {
    fake_state_t state = {
        .count = 1,
        .util = 0,
        .mem_used = 0,
        .mem_total = 24ULL * 1024 * 1024 * 1024,
        .power_mw = 30000,
        .error = FAKE_OK,
        .process_count = 0,
        .xid_count = 0,
        .xid_unsupported = 0,
        .recovery_action_unsupported = 0,
        .recovery_action = 0,
        .free_on_exit = 0,
    };
    const char *path = getenv("FAKE_NVML_STATE_FILE");
    if (path == NULL) return state;
    FILE *file = fopen(path, "r");
    if (file == NULL) return state;
    char line[8192];
    while (fgets(line, sizeof line, file) != NULL) apply_line(&state, line);
    fclose(file);
    return state;
}

/* The common gate of every per-device query: initialised, a known handle, no staged failure. */
static nvmlReturn_t check_device(const fake_state_t *state, nvmlDevice_t device) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (state->error == FAKE_GPU_LOST) lost_until_reinit = 1;
    if (lost_until_reinit) return NVML_ERROR_GPU_IS_LOST;
    if (state->error == FAKE_UNKNOWN) return NVML_ERROR_UNKNOWN;
    if (device == NULL || device < fake_devices || device >= fake_devices + FAKE_MAX_DEVICES)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* A handle for a device that has since disappeared (count shrank) behaves like a lost card. */
    if (device->index >= state->count) {
        lost_until_reinit = 1;
        return NVML_ERROR_GPU_IS_LOST;
    }
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_string(char *buffer, unsigned int length, const char *text) {
    if (buffer == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buffer, text, strlen(text) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    fake_state_t state = read_state();
    if (state.error == FAKE_DRIVER_NOT_LOADED) return NVML_ERROR_DRIVER_NOT_LOADED;
    init_count++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    init_count--;
    if (init_count == 0) lost_until_reinit = 0;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
        case NVML_SUCCESS: return "Success";
        case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
        case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
        case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
        case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
        case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
        case NVML_ERROR_TIMEOUT: return "Timeout";
        case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
        case NVML_ERROR_UNKNOWN: return "Unknown Error";
        default: return "Fake NVML error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    return copy_string(version, length, "999.99.99-fake");
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *device_count) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (device_count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *device_count = read_state().count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    fake_state_t state = read_state();
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (state.error == FAKE_GPU_LOST) lost_until_reinit = 1;
    if (lost_until_reinit) return NVML_ERROR_GPU_IS_LOST;
    if (state.error == FAKE_UNKNOWN) return NVML_ERROR_UNKNOWN;
    if (device == NULL || index >= state.count) return NVML_ERROR_INVALID_ARGUMENT;
    fake_devices[index].index = index;
    *device = &fake_devices[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    fake_state_t state = read_state();
    nvmlReturn_t status = check_device(&state, device);
    if (status != NVML_SUCCESS) return status;
    char text[64];
    snprintf(text, sizeof text, "Fake NVML GPU %u", device->index);
    return copy_string(name, length, text);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    fake_state_t state = read_state();
    nvmlReturn_t status = check_device(&state, device);
    if (status != NVML_SUCCESS) return status;
    if (utilization == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    utilization->gpu = state.util;
    utilization->memory = state.util;
    return NVML_SUCCESS;
}

static void fill_memory(const fake_state_t *state, unsigned long long *total,
                        unsigned long long *free_bytes, unsigned long long *used) {
    *total = state->mem_total;
    *used = state->mem_used;
    *free_bytes = state->mem_used < state->mem_total ? state->mem_total - state->mem_used : 0;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    fake_state_t state = read_state();
    nvmlReturn_t status = check_device(&state, device);
    if (status != NVML_SUCCESS) return status;
    if (memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    fill_memory(&state, &memory->total, &memory->free, &memory->used);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    fake_state_t state = read_state();
    nvmlReturn_t status = check_device(&state, device);
    if (status != NVML_SUCCESS) return status;
    if (memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    memory->reserved = 0;
    fill_memory(&state, &memory->total, &memory->free, &memory->used);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
    fake_state_t state = read_state();
    nvmlReturn_t status = check_device(&state, device);
    if (status != NVML_SUCCESS) return status;
    if (power == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (state.power_mw < 0) return NVML_ERROR_NOT_SUPPORTED;
    *power = (unsigned int)state.power_mw;
    return NVML_SUCCESS;
}

/* ---- compute processes ------------------------------------------------------------------ */

/* nvml.h's nvmlProcessInfo_t (alias nvmlProcessInfo_v2_t), mirrored by pynvml's
 * c_nvmlProcessInfo_v2_t / _v3_t: the _v2 and _v3 entry points share this layout. */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

/* A process whose memory the driver has freed: gone from /proc, or a zombie (its exit has
 * torn down its contexts; only the reaping is left). */
static int exited(unsigned int pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    FILE *file = fopen(path, "r");
    if (file == NULL) return 1;
    char text[512];
    size_t length = fread(text, 1, sizeof text - 1, file);
    fclose(file);
    text[length] = '\0';
    const char *end = strrchr(text, ')');
    return end != NULL && end[1] == ' ' && (end[2] == 'Z' || end[2] == 'X');
}

static void drop_exited(fake_state_t *state) {
    unsigned int kept = 0;
    for (unsigned int i = 0; i < state->process_count; i++) {
        if (!exited(state->processes[i].pid)) state->processes[kept++] = state->processes[i];
    }
    state->process_count = kept;
}

/* nvml.h's contract: *infoCount is the array's size on input and the number of processes
 * on output; a short array answers NVML_ERROR_INSUFFICIENT_SIZE with the size needed. */
static nvmlReturn_t compute_processes(nvmlDevice_t device, unsigned int *info_count,
                                      nvmlProcessInfo_t *infos) {
    fake_state_t state = read_state();
    nvmlReturn_t status = check_device(&state, device);
    if (status != NVML_SUCCESS) return status;
    if (info_count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (state.free_on_exit) drop_exited(&state);
    unsigned int needed = state.process_count;
    if (*info_count < needed) {
        *info_count = needed;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (needed > 0 && infos == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < needed; i++) {
        infos[i].pid = state.processes[i].pid;
        infos[i].usedGpuMemory = state.processes[i].used_bytes;
        /* No MIG: nvml.h reports 0xFFFFFFFF for the instance ids then. */
        infos[i].gpuInstanceId = 0xFFFFFFFFu;
        infos[i].computeInstanceId = 0xFFFFFFFFu;
    }
    *info_count = needed;
    return NVML_SUCCESS;
}

#ifndef FAKE_OMIT_COMPUTE_PROCESSES_V3
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *info_count,
                                                     nvmlProcessInfo_t *infos) {
    return compute_processes(device, info_count, infos);
}
#endif

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device, unsigned int *info_count,
                                                     nvmlProcessInfo_t *infos) {
    return compute_processes(device, info_count, infos);
}

/* ---- events ------------------------------------------------------------------------------ */

#ifndef FAKE_OMIT_EVENTS
/* nvml.h: nvmlEventTypeXidCriticalError. */
#define FAKE_EVENT_XID_CRITICAL 0x0000000000000008ULL
#define FAKE_MAX_EVENT_SETS 16

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

struct nvmlEventSet_st {
    int in_use;
    int registered[FAKE_MAX_DEVICES];
    /* Per device: how many entries of the xid list this set has already passed. */
    unsigned int delivered[FAKE_MAX_DEVICES];
};
typedef struct nvmlEventSet_st *nvmlEventSet_t;

static struct nvmlEventSet_st fake_event_sets[FAKE_MAX_EVENT_SETS];

static int valid_event_set(nvmlEventSet_t set) {
    return set != NULL && set >= fake_event_sets && set < fake_event_sets + FAKE_MAX_EVENT_SETS &&
           set->in_use;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (set == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < FAKE_MAX_EVENT_SETS; i++) {
        if (!fake_event_sets[i].in_use) {
            memset(&fake_event_sets[i], 0, sizeof fake_event_sets[i]);
            fake_event_sets[i].in_use = 1;
            *set = &fake_event_sets[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_UNKNOWN;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types) {
    fake_state_t state = read_state();
    nvmlReturn_t status = check_device(&state, device);
    if (status != NVML_SUCCESS) return status;
    if (types == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *types = state.xid_unsupported ? 0 : FAKE_EVENT_XID_CRITICAL;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types,
                                      nvmlEventSet_t set) {
    fake_state_t state = read_state();
    nvmlReturn_t status = check_device(&state, device);
    if (status != NVML_SUCCESS) return status;
    if (!valid_event_set(set)) return NVML_ERROR_INVALID_ARGUMENT;
    /* nvml.h: NOT_SUPPORTED "if the platform does not support this feature or some of
     * requested event types". */
    if (state.xid_unsupported || (types & ~FAKE_EVENT_XID_CRITICAL) != 0)
        return NVML_ERROR_NOT_SUPPORTED;
    if (types & FAKE_EVENT_XID_CRITICAL) {
        set->registered[device->index] = 1;
        set->delivered[device->index] = state.xid_count; /* earlier events are not seen */
    }
    return NVML_SUCCESS;
}

/* The oldest undelivered XID of any registered device; 0 when none is pending. */
static int next_event(nvmlEventSet_t set, const fake_state_t *state, nvmlEventData_t *data) {
    int best = -1;
    for (unsigned int i = 0; i < state->count && i < FAKE_MAX_DEVICES; i++) {
        if (!set->registered[i] || set->delivered[i] >= state->xid_count) continue;
        if (best < 0 || set->delivered[i] < set->delivered[best]) best = (int)i;
    }
    if (best < 0) return 0;
    fake_devices[best].index = (unsigned int)best;
    data->device = &fake_devices[best];
    data->eventType = FAKE_EVENT_XID_CRITICAL;
    data->eventData = state->xids[set->delivered[best]];
    data->gpuInstanceId = 0xFFFFFFFFu;
    data->computeInstanceId = 0xFFFFFFFFu;
    set->delivered[best]++;
    return 1;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (!valid_event_set(set) || data == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    /* Poll the state file every 10 ms until the timeout, as a blocking wait would. */
    const struct timespec step = {.tv_sec = 0, .tv_nsec = 10 * 1000 * 1000};
    for (unsigned int waited = 0;; waited += 10) {
        fake_state_t state = read_state();
        if (next_event(set, &state, data)) return NVML_SUCCESS;
        if (waited >= timeout_ms) return NVML_ERROR_TIMEOUT;
        nanosleep(&step, NULL);
    }
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    if (init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (!valid_event_set(set)) return NVML_ERROR_INVALID_ARGUMENT;
    set->in_use = 0;
    return NVML_SUCCESS;
}
#endif

/* ---- field values ------------------------------------------------------------------------ */

#ifndef FAKE_OMIT_FIELD_VALUES
#define FAKE_FI_DEV_GET_GPU_RECOVERY_ACTION 230
#define FAKE_VALUE_TYPE_UNSIGNED_INT 1

typedef union {
    double dVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    signed long long sllVal;
    signed int siVal;
    unsigned short usVal;
} nvmlValue_t;

/* nvml.h's nvmlFieldValue_t, as pynvml's c_nvmlFieldValue_t mirrors it. */
typedef struct {
    unsigned int fieldId;
    unsigned int scopeId;
    long long timestamp;
    long long latencyUsec;
    unsigned int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int count, nvmlFieldValue_t *values) {
    fake_state_t state = read_state();
    nvmlReturn_t status = check_device(&state, device);
    if (status != NVML_SUCCESS) return status;
    if (count < 0 || (count > 0 && values == NULL)) return NVML_ERROR_INVALID_ARGUMENT;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    for (int i = 0; i < count; i++) {
        nvmlFieldValue_t *field = &values[i];
        field->timestamp = (long long)now.tv_sec * 1000000LL + now.tv_nsec / 1000;
        field->latencyUsec = 0;
        if (field->fieldId != FAKE_FI_DEV_GET_GPU_RECOVERY_ACTION ||
            state.recovery_action_unsupported) {
            field->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            continue;
        }
        field->nvmlReturn = NVML_SUCCESS;
        field->valueType = FAKE_VALUE_TYPE_UNSIGNED_INT;
        field->value.ullVal = 0;
        field->value.uiVal = state.recovery_action;
    }
    return NVML_SUCCESS;
}
#endif
