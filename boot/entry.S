/*
 * The one 32-bit entry shared by the multiboot, PVH and Linux (bzImage) paths (and a 64-bit one
 * for blimp.efi, below). Multiboot1, multiboot2 (GRUB) and PVH
 * (QEMU -kernel, Firecracker, cloud-hypervisor) all enter in 32-bit protected mode with paging off;
 * we record what we were given, identity-map the first 4 GiB with 2 MiB pages, switch to long mode
 * and call kmain(boot_magic, boot_info_phys). kmain tells the paths apart by the magic.
 */
#define MB2_MAGIC     0xE85250D6
#define PVH_MARKER    0x336ec578 /* hvm_start_info magic: passed to kmain as the PVH "magic" */
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define UEFI_MARKER   0x55454649              /* UEFI_BOOT_MAGIC in boot/boot_info.h */
#define LINUX_MARKER  0x53726448              /* LINUX_BOOT_MAGIC ("HdrS") in boot/boot_info.h */
#define LINUX64_MARKER 0x34366448             /* LINUX64_BOOT_MAGIC ("Hd64") */

    .section .multiboot2, "a"
    .balign 8
mb2_header:
    .long MB2_MAGIC
    .long 0                                   /* architecture: i386 protected mode */
    .long mb2_header_end - mb2_header
    .long -(MB2_MAGIC + 0 + (mb2_header_end - mb2_header))
    .short 0, 0                               /* end tag */
    .long 8
mb2_header_end:

/*
 * What blimp.efi (boot/efi/main.c) needs to load this image from its flat binary: found by
 * the magic in the first 32 KiB, like a multiboot header. Addresses are physical (= linked).
 */
    .section .boot.handover, "a"
    .balign 8
    .global blimp_handover
blimp_handover:
    .ascii "BLIMPEFI"                         /* magic */
    .long 1                                   /* version */
    .long blimp_handover_end - blimp_handover /* size */
    .quad _kernel_start                       /* load address of the binary's first byte */
    .quad _edata                              /* end of the loaded bytes */
    .quad __bss_end                           /* end of .bss (zeroed by the loader) */
    .quad uefi_entry64                        /* 64-bit entry: rdi = multiboot2-format info */
blimp_handover_end:

/* PVH entry note. Keep it 4-aligned: QEMU 7.2 pads the note name to the segment's p_align. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                                   /* namesz */
    .long 4                                   /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long pvh_entry32

/*
 * The Linux boot protocol's entries (build/blimp.bzImage; boot/linux_setup.S): the 32-bit one at
 * the load address (code32_start), the 64-bit one at code32_start + 0x200 (XLF_KERNEL_64: 64-bit
 * loaders such as crosvm; GRUB 2.06 takes the 32-bit one even on UEFI). linker.ld puts them
 * there, ahead of the multiboot headers. kmain takes the info address in 32 bits: every loader
 * we know puts boot_params low (crosvm at 0x7000).
 */
    .section .boot.linux32, "ax"
    .code32
    .global linux_entry32
linux_entry32:                                /* protected mode, esi = boot_params */
    cli
    mov %esi, %edi
    mov $LINUX_MARKER, %esi
    jmp common32

    .section .boot.linux64, "ax"
    .code64
    .global linux_entry64
linux_entry64:                                /* long mode, the loader's paging, rsi = boot_params */
    cli
    mov %rsi, %rbx
    mov $LINUX64_MARKER, %r12d
    jmp take_over64

    .section .boot.text, "ax"
    .code32
    .global mb_entry32
mb_entry32:                                   /* multiboot1/2: eax = magic, ebx = info */
    cli
    mov %eax, %esi
    mov %ebx, %edi
    jmp common32

    .global pvh_entry32
pvh_entry32:                                  /* PVH: ebx = hvm_start_info; falls through */
    cli
    mov $PVH_MARKER, %esi
    mov %ebx, %edi

common32:
    /* The very first thing timed: the boot report measures from here. */
    rdtsc
    mov %eax, boot_tsc
    mov %edx, boot_tsc + 4
    mov %esi, boot_magic
    mov %edi, boot_info_phys

    /* Zero .bss (page tables and the stack live there); the loaders do not all do it. */
    cld
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl

    /* PML4[0] -> PDPT; PDPT[0..3] -> four page directories of 512 x 2 MiB = 4 GiB identity. */
    mov $boot_pdpt, %eax
    or $0x3, %eax
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $0x3, %eax
    mov $boot_pdpt, %edi
    mov $4, %ecx
1:  mov %eax, (%edi)
    add $4096, %eax
    add $8, %edi
    loop 1b
    mov $boot_pd, %edi
    mov $0x83, %eax                           /* present | writable | 2 MiB page */
    xor %edx, %edx                            /* high dword of the physical address */
    mov $2048, %ecx
2:  mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $0x200000, %eax
    adc $0, %edx
    add $8, %edi
    loop 2b

    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $(1 << 5), %eax                        /* PAE */
    mov %eax, %cr4
    mov $0xC0000080, %ecx                     /* EFER */
    rdmsr
    or $(1 << 8), %eax                        /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax                      /* PG | PE */
    mov %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $long_entry

    .code64
/*
 * blimp.efi's entry, after ExitBootServices: long mode, the firmware's identity paging and
 * GDT, interrupts maybe on, rdi = the multiboot2-format info block (below 4 GiB). Take over
 * like the 32-bit path does: our own page tables (4 GiB identity, as above), GDT and stack,
 * then kmain(UEFI_MARKER, info). linux_entry64 joins at take_over64 (rbx = info, r12d = magic).
 */
    .global uefi_entry64
uefi_entry64:
    cli
    mov %rdi, %rbx
    mov $UEFI_MARKER, %r12d
take_over64:
    rdtsc
    mov %eax, boot_tsc(%rip)
    mov %edx, boot_tsc + 4(%rip)
    mov %r12d, boot_magic(%rip)
    mov %ebx, boot_info_phys(%rip)

    cld                                       /* zero .bss again: cheap, and loader-proof */
    lea __bss_start(%rip), %rdi
    lea __bss_end(%rip), %rcx
    sub %rdi, %rcx
    shr $3, %rcx
    xor %eax, %eax
    rep stosq

    lea boot_pdpt(%rip), %rax
    or $0x3, %rax
    mov %rax, boot_pml4(%rip)
    lea boot_pd(%rip), %rax
    or $0x3, %rax
    lea boot_pdpt(%rip), %rdi
    mov $4, %ecx
4:  mov %rax, (%rdi)
    add $4096, %rax
    add $8, %rdi
    loop 4b
    lea boot_pd(%rip), %rdi
    mov $0x83, %eax                           /* present | writable | 2 MiB page */
    mov $2048, %ecx
5:  mov %rax, (%rdi)
    add $0x200000, %rax
    add $8, %rdi
    loop 5b

    mov %cr4, %rax                            /* no global pages: every firmware mapping */
    and $~(1 << 7), %rax                      /* leaves the TLB with the next CR3 load */
    mov %rax, %cr4
    lea boot_pml4(%rip), %rax
    mov %rax, %cr3
    lgdt boot_gdt_ptr(%rip)
    pushq $0x08
    lea long_entry(%rip), %rax
    push %rax
    lretq

long_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp
    xor %ebp, %ebp
    mov boot_magic(%rip), %edi
    mov boot_info_phys(%rip), %esi
    call kmain
3:  cli
    hlt
    jmp 3b

    .section .data
    .balign 8
    .global boot_tsc
boot_tsc:       .quad 0
boot_magic:     .long 0
boot_info_phys: .long 0
    .balign 16
    .global boot_gdt
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF                  /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF                  /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:                                 /* 6 bytes for the 32-bit lgdt, 10 for the 64-bit one */
    .short boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .bss
    .balign 4096
    .global boot_pml4
boot_pml4:  .skip 4096
boot_pdpt:  .skip 4096
boot_pd:    .skip 4 * 4096
boot_stack: .skip 64 * 1024
boot_stack_top:

    .section .note.GNU-stack, "", @progbits
