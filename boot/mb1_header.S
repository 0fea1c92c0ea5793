/*
 * Multiboot1 header, linked only into build/blimp-mb1.elf. QEMU refuses an ELF64 multiboot1
 * image and prefers multiboot1 over PVH when both exist, so the main image must not carry it.
 * The a.out kludge (flag bit 16) makes QEMU load the file by these addresses instead of parsing
 * the ELF64 headers; linker.ld keeps file offsets linear with addresses for that.
 */
#define MB1_MAGIC 0x1BADB002
#define MB1_FLAGS ((1 << 1) | (1 << 16))      /* memory map wanted, address fields valid */

    .section .multiboot1, "a"
    .balign 4
mb1_header:
    .long MB1_MAGIC
    .long MB1_FLAGS
    .long -(MB1_MAGIC + MB1_FLAGS)
    .long mb1_header                          /* header_addr */
    .long _kernel_start                       /* load_addr */
    .long _edata                              /* load_end_addr */
    .long __bss_end                           /* bss_end_addr */
    .long mb_entry32                          /* entry_addr */

    .section .note.GNU-stack, "", @progbits
