/*
 * A stand-in for libnvidia-ml.so.1, so the NVML adapter can be tested on machines
 * without a GPU, and GPU failures (a lost card, an unloaded driver) can be staged
 * on demand.
 *
 * Only the symbols that pynvml resolves for the sidecar's code paths are exported.
 * Their state is re-read from the file named by FAKE_NVML_STATE_FILE on every call,
 * so a test or a simulated trainer can change it between polls of a running process.
 * Format: one key=value per line; unknown keys are ignored, a missing file or key
 * means the default.
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

typedef enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
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

typedef struct {
    unsigned int count;
    unsigned int util;
    unsigned long long mem_used;
    unsigned long long mem_total;
    long long power_mw;
    fake_error_t error;
} fake_state_t;

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
    };
    const char *path = getenv("FAKE_NVML_STATE_FILE");
    if (path == NULL) return state;
    FILE *file = fopen(path, "r");
    if (file == NULL) return state;
    char line[256];
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
