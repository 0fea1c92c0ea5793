/*
 * The kernel blimp.efi starts: `objcopy -O binary` of build/blimp.elf (its one load segment from
 * _kernel_start to _edata; .bss is zeroed by the loader). The path comes from the build.
 */
    .section .data
    .balign 4096
    .global blimp_payload, blimp_payload_end
blimp_payload:
    .incbin BLIMP_PAYLOAD
blimp_payload_end:

    .section .note.GNU-stack, "", @progbits
