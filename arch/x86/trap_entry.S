/* Entry points of all 256 vectors: give every vector the same frame (a dummy error code where the
 * CPU pushes none), save the general registers and call trap_handler(struct trap_frame *).
 * Exceptions (0-31) never come back from it; external interrupts (32-255) return with iretq. */
    .text
    .code64

.macro VECTOR_ENTRY vec, has_error
    .global trap_entry_\vec
trap_entry_\vec:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vec
    jmp trap_common
.endm

VECTOR_ENTRY 0, 0
VECTOR_ENTRY 1, 0
VECTOR_ENTRY 2, 0
VECTOR_ENTRY 3, 0
VECTOR_ENTRY 4, 0
VECTOR_ENTRY 5, 0
VECTOR_ENTRY 6, 0
VECTOR_ENTRY 7, 0
VECTOR_ENTRY 8, 1
VECTOR_ENTRY 9, 0
VECTOR_ENTRY 10, 1
VECTOR_ENTRY 11, 1
VECTOR_ENTRY 12, 1
VECTOR_ENTRY 13, 1
VECTOR_ENTRY 14, 1
VECTOR_ENTRY 15, 0
VECTOR_ENTRY 16, 0
VECTOR_ENTRY 17, 1
VECTOR_ENTRY 18, 0
VECTOR_ENTRY 19, 0
VECTOR_ENTRY 20, 0
VECTOR_ENTRY 21, 1
VECTOR_ENTRY 22, 0
VECTOR_ENTRY 23, 0
VECTOR_ENTRY 24, 0
VECTOR_ENTRY 25, 0
VECTOR_ENTRY 26, 0
VECTOR_ENTRY 27, 0
VECTOR_ENTRY 28, 0
VECTOR_ENTRY 29, 1
VECTOR_ENTRY 30, 1
VECTOR_ENTRY 31, 0

trap_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    mov %rsp, %rbp            /* callee-saved: the frame pointer survives the call */
    and $-16, %rsp
    call trap_handler
    mov %rbp, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp             /* vector and error code */
    iretq

/* External vectors 32..255: 16 bytes apart from irq_entries (traps.c computes the addresses). */
    .balign 16
    .global irq_entries
irq_entries:
    .set irq_vec, 32
    .rept 224
    .balign 16
    pushq $0
    pushq $irq_vec
    jmp trap_common
    .set irq_vec, irq_vec + 1
    .endr

    .section .rodata
    .balign 8
    .global trap_entries
trap_entries:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad trap_entry_\v
    .endr

    .section .note.GNU-stack, "", @progbits
