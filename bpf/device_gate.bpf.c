// The device gate: a BPF_PROG_TYPE_CGROUP_DEVICE program attached to one worker's cgroup
// (unified hierarchy). The kernel asks it before any process in the group opens or creates a
// device node; it allows exactly the grants the daemon put in `allowed` and counts every
// refusal in `denials`, which the daemon reads for its metrics.
//
// Compiled with clang (-target bpf) by the runtime crate's build script; one copy is loaded
// per worker, so each worker has its own maps.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* A grant for every minor number of a major (`minor` in the key). */
#define ANY_MINOR 0xffffffffu

struct device_key {
	__u32 type;  /* BPF_DEVCG_DEV_CHAR or BPF_DEVCG_DEV_BLOCK */
	__u32 major;
	__u32 minor; /* or ANY_MINOR */
};

/* Granted devices: the access bits (BPF_DEVCG_ACC_MKNOD | _READ | _WRITE) allowed. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct device_key);
	__type(value, __u32);
} allowed SEC(".maps");

/* Refusals so far, in slot 0. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} denials SEC(".maps");

SEC("cgroup/dev")
int device_gate(struct bpf_cgroup_dev_ctx *ctx)
{
	struct device_key key = {
		.type = ctx->access_type & 0xffff,
		.major = ctx->major,
		.minor = ctx->minor,
	};
	__u32 access = ctx->access_type >> 16;
	__u32 *granted = bpf_map_lookup_elem(&allowed, &key);

	if (!granted) {
		key.minor = ANY_MINOR;
		granted = bpf_map_lookup_elem(&allowed, &key);
	}
	if (granted && (*granted & access) == access)
		return 1;

	__u32 slot = 0;
	__u64 *count = bpf_map_lookup_elem(&denials, &slot);
	if (count)
		__sync_fetch_and_add(count, 1);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
