/*
 * The real-mode part of build/blimp.bzImage (the Linux x86 boot protocol, version 2.12; offsets
 * from Documentation/arch/x86/boot.rst). A loader copies these (setup_sects + 1) sectors to a
 * segment below 1 MiB, blimp.bin (the kernel, linked at 1 MiB) to 0x100000, and either
 *   - jumps here in real mode at setup + 0x200 (QEMU -kernel's option ROM: CS = seg + 0x20,
 *     IP 0; kvmtool: CS = seg, IP 0x200; DS = ES = SS = seg in both), or
 *   - builds its own boot_params ("zero page") and jumps to code32_start in 32-bit protected
 *     mode with %esi = boot_params (GRUB's `linux` on BIOS), or to code32_start + 0x200 in long
 *     mode with %rsi = boot_params (XLF_KERNEL_64; 64-bit loaders).
 * The real-mode path makes this setup area itself the boot_params: it asks the BIOS for the
 * E820 map (int 0x15) into e820_table, enters 32-bit protected mode and takes the 32-bit path.
 * Only DS is trusted for addresses (the two CS:IP conventions differ); jumps are IP-relative.
 * Linked by boot/bzimage.ld with blimp.elf's symbols (ld -R) for the header's sizes and entry.
 */
#define E820_ENTRIES  0x1e8            /* u8 in boot_params */
#define E820_TABLE    0x2d0            /* 20-byte entries */
#define E820_MAX      128
#define SMAP          0x534d4150       /* "SMAP" */
#define CODE32_START  0x214
#define CMDLINE_SIZE  1023             /* BOOT_CMDLINE_MAX - 1 in boot/boot_info.h */
#define LOADED_HIGH   0x01
#define XLF_KERNEL_64 0x01

    .code16
    .section .setup, "ax"
setup_start:
    .org 0x1f1                         /* the boot sector's tail: the setup header */
    .byte blimp_setup_sects            /* setup_sects: sectors after this one */
    .short 0                           /* root_flags */
    .long blimp_syssize                /* syssize: protected-mode part in 16-byte units */
    .short 0                           /* ram_size */
    .short 0xffff                      /* vid_mode: "normal" */
    .short 0                           /* root_dev */
    .short 0xaa55                      /* boot_flag */
    .byte 0xeb, to_real_entry - setup_start - 0x202 /* jump: to the real-mode entry */
    .ascii "HdrS"                      /* header (0x202) */
    .short 0x020c                      /* version */
    .long 0                            /* realmode_swtch */
    .short 0                           /* start_sys_seg */
    .short 0                           /* kernel_version: no string */
    .byte 0                            /* type_of_loader: the loader's */
    .byte LOADED_HIGH                  /* loadflags: the kernel is at 0x100000 */
    .short 0                           /* setup_move_size */
    .long linux_entry32                /* code32_start (boot/entry.S) */
    .long 0, 0                         /* ramdisk_image, ramdisk_size: no initrd wanted */
    .long 0                            /* bootsect_kludge */
    .short 0                           /* heap_end_ptr */
    .byte 0, 0                         /* ext_loader_ver, ext_loader_type */
    .long 0                            /* cmd_line_ptr: the loader's */
    .long 0x7fffffff                   /* initrd_addr_max */
    .long 0x1000                       /* kernel_alignment */
    .byte 0                            /* relocatable_kernel: no, linked at 1 MiB */
    .byte 12                           /* min_alignment (log2) */
    .short XLF_KERNEL_64               /* xloadflags: linux_entry64 at code32_start + 0x200 */
    .long CMDLINE_SIZE                 /* cmdline_size: what boot_info can hold */
    .long 0                            /* hardware_subarch: a PC */
    .quad 0                            /* hardware_subarch_data */
    .long 0, 0                         /* payload_offset, payload_length: not compressed */
    .quad 0                            /* setup_data */
    .quad 0x100000                     /* pref_address */
    .long blimp_init_size              /* init_size: the image with its .bss */
    .long 0                            /* handover_offset: no EFI handover */
    .org 0x26c                         /* the end of the 2.15 header */
to_real_entry:
    jmp real_entry                     /* e820_table (0x2d0..0xcd0) lies between */

    .org 0x1000                        /* past the zero page: boot_params stays data only */
real_entry:
    cli
    cld
    mov %ds, %ax
    mov %ax, %es

    /* The BIOS memory map into e820_table, as Linux's setup does (QEMU's and kvmtool's
     * BIOSes answer E820). Nothing else is asked of the BIOS. */
    xor %ebx, %ebx                     /* continuation */
    mov $E820_TABLE, %di
    xor %si, %si                       /* entries */
1:  mov $0xe820, %eax
    mov $20, %ecx
    mov $SMAP, %edx
    int $0x15
    jc 2f
    cmp $SMAP, %eax
    jne 2f
    inc %si
    add $20, %di
    cmp $E820_MAX, %si
    jae 2f
    test %ebx, %ebx
    jnz 1b
2:  mov %si, %ax
    movb %al, E820_ENTRIES

    in $0x92, %al                      /* fast A20 on (the kernel is at 1 MiB), no reset */
    or $0x02, %al
    and $0xfe, %al
    out %al, $0x92

    xor %ebx, %ebx                     /* ebx = linear address of this setup = boot_params */
    mov %ds, %bx
    shl $4, %ebx
    lea gdt(%ebx), %eax
    mov %eax, gdt_ptr + 2
    lea pm32(%ebx), %eax
    mov %eax, pm32_ptr
    lgdtl gdt_ptr
    mov %cr0, %eax
    or $1, %eax                        /* PE */
    mov %eax, %cr0
    ljmpl *pm32_ptr

    .code32
pm32:                                  /* flat 32-bit, running at ebx + pm32 */
    mov $0x18, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    mov %eax, %ss
    mov %ebx, %esi                     /* the 32-bit boot protocol: esi = boot_params */
    jmp *CODE32_START(%ebx)

    .balign 8
gdt:                                   /* Linux's boot selectors: __BOOT_CS 0x10, __BOOT_DS 0x18 */
    .quad 0, 0
    .quad 0x00cf9a000000ffff           /* 0x10: 32-bit code, flat */
    .quad 0x00cf92000000ffff           /* 0x18: data, flat */
gdt_end:
gdt_ptr:
    .short gdt_end - gdt - 1
    .long 0                            /* linear base, set above */
pm32_ptr:
    .long 0                            /* linear pm32, set above */
    .short 0x10

    .section .note.GNU-stack, "", @progbits
