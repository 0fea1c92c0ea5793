/*
 * The agent: a line-based command channel on the second serial port (COM2) through which a
 * host-side program drives guest workloads while the balloon runs. One command per line, one
 * JSON reply per line; docs/agent.md documents the commands.
 */
#ifndef KERNEL_AGENT_H
#define KERNEL_AGENT_H

#include <stdbool.h>
#include "virtio/balloon.h"

/* Returns false when there is no second UART (the agent is then off). */
bool agent_init(const struct balloon *b);
/* Handles any bytes and complete command lines waiting on COM2; never blocks. Returns whether
 * it read anything (a command may have changed memory the balloon cares about). */
bool agent_poll(void);
/* A host runner's answer to a request the guest printed (docs/conformance.md): ack with the
 * rest of the line (`key=value ...`), or nack with the reason. Returns false when no request
 * with that number is waiting (the agent then replies with an error). */
typedef bool (*agent_answer_fn)(void *ctx, bool ack, uint64_t seq, const char *rest);
void agent_set_answer_handler(agent_answer_fn fn, void *ctx);
/* Pages the agent's allocations take from the allocator: held memory and its record pages. */
uint64_t agent_owned_pages(void);

#endif
