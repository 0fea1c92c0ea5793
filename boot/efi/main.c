/*
 * blimp.efi: a UEFI application that starts the same blimp kernel as every other boot path.
 *
 * It carries the kernel's flat image (boot/efi/payload.S), finds the handover header in it
 * (boot/entry.S), places the image at its link address with AllocatePages(AllocateAddress),
 * builds a multiboot2-format info block (command line, ACPI RSDP copy, the final EFI memory
 * map) below 4 GiB, exits boot services and jumps to the kernel's 64-bit entry, which reports
 * protocol "uefi". Design notes: docs/design.md, "Boot".
 *
 * Built with Debian's gnu-efi (gcc only; see build.ninja): crt0 calls efi_main with the SysV
 * ABI, firmware calls are ms_abi through GNU_EFI_USE_MS_ABI.
 */
#include <efi.h>
#include <efilib.h>

#include "boot/boot_info.h"

extern const unsigned char blimp_payload[], blimp_payload_end[];

#define CMDLINE_FILE      L"\\blimp\\cmdline"
#define INJECT_FILE       L"\\blimp\\inject"
#define HANDOVER_SCAN     (32 * 1024)
#define EXIT_ATTEMPTS     8
#define MAP_SLACK_ENTRIES 32 /* descriptors beyond what the first GetMemoryMap reported */
#define RSDP_V1_BYTES     20
#define RSDP_V2_MAX       256
#define MB2_TAG_CMDLINE   1
#define MB2_TAG_ACPI_OLD  14
#define MB2_TAG_ACPI_NEW  15
#define MB2_TAG_EFI_MMAP  17
#define MB2_TAG_END       0

/* boot/entry.S, blimp_handover */
struct handover {
    char magic[8];
    UINT32 version;
    UINT32 size;
    UINT64 load;
    UINT64 edata;
    UINT64 bss_end;
    UINT64 entry;
};

static char cmdline[BOOT_CMDLINE_MAX];
/* Damage done on purpose so a test can prove the kernel's detector fires (like blimp.inject=):
 * \blimp\inject holding "mb2_tag_size" gives the command line tag a size past the block. */
static BOOLEAN inject_tag_size;
/* "linux64" there instead: enter the kernel the Linux 64-bit way (code32_start + 0x200, rsi =
 * a boot_params built here), the one loader on these machines that tests linux_entry64. */
static BOOLEAN enter_linux64;

static void put_u32(UINT8 *at, UINT32 v)
{
    CopyMem(at, &v, 4);
}

static void put_u64(UINT8 *at, UINT64 v)
{
    CopyMem(at, &v, 8);
}

/* EFI memory types after ExitBootServices as E820 types (as boot/boot_info.c reads them). */
static UINT32 e820_type(UINT32 efi)
{
    switch (efi) {
    case EfiLoaderCode:
    case EfiLoaderData:
    case EfiBootServicesCode:
    case EfiBootServicesData:
    case EfiConventionalMemory:
        return 1;
    case EfiACPIReclaimMemory:
        return 3;
    case EfiACPIMemoryNVS:
        return 4;
    case EfiUnusableMemory:
        return 5;
    default:
        return 2;
    }
}

/* A zero page as a Linux loader leaves it: the setup header's magic and version, the command
 * line, the RSDP and the final EFI map as E820 (neighbours of one type merged: at most 128). */
static void build_boot_params(UINT8 *bp, const char *cl, const UINT8 *rsdp, const UINT8 *map,
                              UINTN map_size, UINTN dsize)
{
    CopyMem(bp + 0x202, "HdrS", 4);
    bp[0x206] = 0x0c;
    bp[0x207] = 0x02;
    put_u32(bp + 0x228, (UINT32)(UINTN)cl);
    put_u32(bp + 0x238, BOOT_CMDLINE_MAX - 1);
    put_u64(bp + 0x070, (UINT64)(UINTN)rsdp);
    UINTN n = 0;
    UINT64 end = 0;
    UINT32 last = 0;
    for (UINTN off = 0; off + dsize <= map_size; off += dsize) {
        const EFI_MEMORY_DESCRIPTOR *d = (const void *)(map + off);
        UINT64 base = d->PhysicalStart, size = d->NumberOfPages << 12;
        UINT32 type = e820_type(d->Type);
        UINT8 *e = bp + 0x2d0 + 20 * (n ? n - 1 : 0);
        if (n && type == last && base == end) {
            put_u64(e + 8, base + size - *(UINT64 *)e);
        } else if (n < 128) {
            e = bp + 0x2d0 + 20 * n++;
            put_u64(e, base);
            put_u64(e + 8, size);
            put_u32(e + 16, type);
        }
        end = base + size;
        last = type;
    }
    bp[0x1e8] = (UINT8)n;
}

/* Reads at most *size bytes of `name` on our volume into buf; EFI_NOT_FOUND when absent. */
static EFI_STATUS read_file(EFI_LOADED_IMAGE *li, CHAR16 *name, void *buf, UINTN *size)
{
    EFI_FILE_HANDLE root = LibOpenRoot(li->DeviceHandle), fh;
    if (!root)
        return EFI_NOT_FOUND;
    EFI_STATUS st = root->Open(root, &fh, name, EFI_FILE_MODE_READ, 0);
    if (st == EFI_SUCCESS) {
        st = fh->Read(fh, size, buf);
        fh->Close(fh);
    }
    root->Close(root);
    return st;
}

static void com1_puts(const char *s)
{
    for (; *s; s++) {
        for (int i = 0; i < 100000; i++) {
            UINT8 lsr;
            __asm__ volatile("inb %1, %0" : "=a"(lsr) : "Nd"((UINT16)0x3fd));
            if (lsr & 0x20)
                break;
        }
        __asm__ volatile("outb %0, %1" : : "a"((UINT8)*s), "Nd"((UINT16)0x3f8));
    }
}

/* Before ExitBootServices: say why, then power off (QEMU -no-reboot exits) rather than fall
 * back to the next boot option and hide the failure. */
static EFI_STATUS fail(EFI_STATUS status)
{
    Print(L"blimp.efi: giving up (%r)\n", status);
    RT->ResetSystem(EfiResetShutdown, status, 0, NULL);
    return status;
}

/* After the first ExitBootServices only the serial port is left to us. */
static void __attribute__((noreturn)) fail_late(const char *why)
{
    com1_puts("blimp.efi: error: ");
    com1_puts(why);
    com1_puts("\r\n");
    for (;;)
        __asm__ volatile("cli; hlt");
}

static const struct handover *find_handover(void)
{
    UINTN size = (UINTN)(blimp_payload_end - blimp_payload);
    UINTN scan = size < HANDOVER_SCAN ? size : HANDOVER_SCAN;
    for (UINTN off = 0; off + sizeof(struct handover) <= scan; off += 8) {
        const struct handover *h = (const void *)(blimp_payload + off);
        if (CompareMem(h->magic, "BLIMPEFI", 8) != 0)
            continue;
        if (h->version != 1 || h->size < sizeof(*h) || h->load & 0xfff ||
            h->edata - h->load != size || h->bss_end < h->edata || h->entry < h->load ||
            h->entry >= h->edata || h->bss_end > 0x100000000ull) {
            Print(L"blimp.efi: error: the kernel's handover header is inconsistent\n");
            return NULL;
        }
        return h;
    }
    Print(L"blimp.efi: error: no handover header in the first %d KiB of the kernel\n",
          HANDOVER_SCAN / 1024);
    return NULL;
}

/* Printable ASCII in, whitespace runs (space, tab, CR, LF) as single spaces, none at either
 * end. Returns the length, or -1 for a character outside ASCII text. The length may exceed
 * `cap`: then only the first cap bytes are stored, and the caller can name the size. */
static INTN normalise(const UINT16 *wide, const char *narrow, UINTN n, char *out, UINTN cap)
{
    UINTN len = 0;
    BOOLEAN space = FALSE;
    for (UINTN i = 0; i < n; i++) {
        UINT16 c = wide ? wide[i] : (UINT8)narrow[i];
        if (c == 0)
            break;
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
            space = len > 0;
            continue;
        }
        if (c < 0x20 || c > 0x7e)
            return -1;
        if (space) {
            if (len < cap)
                out[len] = ' ';
            len++;
            space = FALSE;
        }
        if (len < cap)
            out[len] = (char)c;
        len++;
    }
    return (INTN)len;
}

/* The UEFI shell passes its whole command line, program first: drop a first word that names
 * an .efi file (kernel options always contain '='). */
static void drop_image_name(char *s)
{
    UINTN end = 0;
    while (s[end] && s[end] != ' ')
        end++;
    if (end < 4)
        return;
    const char *ext = s + end - 4;
    if (ext[0] != '.' || (ext[1] | 0x20) != 'e' || (ext[2] | 0x20) != 'f' || (ext[3] | 0x20) != 'i')
        return;
    UINTN from = s[end] == ' ' ? end + 1 : end, i = 0;
    while (s[from + i]) {
        s[i] = s[from + i];
        i++;
    }
    s[i] = 0;
}

static EFI_STATUS too_long(const CHAR16 *source, INTN len)
{
    Print(L"blimp.efi: error: command line from %s too long: %d bytes, at most %d\n", source, len,
          BOOT_CMDLINE_MAX - 1);
    return EFI_BAD_BUFFER_SIZE;
}

/* The command line: the load options when they hold text, else \blimp\cmdline on our own
 * volume (the default \EFI\BOOT\BOOTX64.EFI boot passes no options), else empty. */
static EFI_STATUS get_cmdline(EFI_LOADED_IMAGE *li)
{
    const UINTN cap = BOOT_CMDLINE_MAX - 1;
    if (li->LoadOptions && li->LoadOptionsSize >= 2) {
        INTN len = normalise(li->LoadOptions, NULL, li->LoadOptionsSize / 2, cmdline, cap);
        if (len < 0) {
            Print(L"blimp.efi: load options are not text (%d bytes): ignored\n",
                  li->LoadOptionsSize);
        } else {
            if ((UINTN)len > cap)
                return too_long(L"the load options", len);
            cmdline[len] = 0;
            drop_image_name(cmdline);
            if (cmdline[0]) {
                Print(L"blimp.efi: command line from the load options: \"%a\"\n", cmdline);
                return EFI_SUCCESS;
            }
        }
    }
    cmdline[0] = 0;
    static char buf[4 * BOOT_CMDLINE_MAX];
    UINTN size = sizeof(buf);
    EFI_STATUS st = read_file(li, CMDLINE_FILE, buf, &size);
    if (st == EFI_NOT_FOUND) {
        Print(L"blimp.efi: no load options and no %s: empty command line\n", CMDLINE_FILE);
        return EFI_SUCCESS;
    }
    if (EFI_ERROR(st)) {
        Print(L"blimp.efi: error: reading %s: %r\n", CMDLINE_FILE, st);
        return st;
    }
    INTN len = normalise(NULL, buf, size, cmdline, cap);
    if (len < 0) {
        Print(L"blimp.efi: error: %s is not ASCII text\n", CMDLINE_FILE);
        return EFI_INVALID_PARAMETER;
    }
    if ((UINTN)len > cap || size == sizeof(buf))
        return too_long(CMDLINE_FILE, size == sizeof(buf) ? (INTN)size : len);
    cmdline[len] = 0;
    Print(L"blimp.efi: command line from %s: \"%a\"\n", CMDLINE_FILE, cmdline);
    return EFI_SUCCESS;
}

/* The RSDP from the configuration table, ACPI 2.0+ preferred; *bytes is what to copy. */
static const UINT8 *find_rsdp(UINTN *bytes, UINT32 *tag)
{
    EFI_GUID acpi20 = ACPI_20_TABLE_GUID, acpi10 = ACPI_TABLE_GUID;
    for (int pass = 0; pass < 2; pass++) {
        for (UINTN i = 0; i < ST->NumberOfTableEntries; i++) {
            EFI_CONFIGURATION_TABLE *t = &ST->ConfigurationTable[i];
            if (CompareGuid(&t->VendorGuid, pass == 0 ? &acpi20 : &acpi10) != 0)
                continue;
            const UINT8 *r = t->VendorTable;
            if (CompareMem(r, "RSD PTR ", 8) != 0)
                continue;
            if (pass == 0 && r[15] >= 2) {
                UINT32 len = *(const UINT32 *)(r + 20);
                *bytes = len >= 36 && len <= RSDP_V2_MAX ? len : 36;
                *tag = MB2_TAG_ACPI_NEW;
            } else {
                *bytes = RSDP_V1_BYTES;
                *tag = MB2_TAG_ACPI_OLD;
            }
            return r;
        }
    }
    return NULL;
}

static UINTN align8(UINTN v)
{
    return (v + 7) & ~(UINTN)7;
}

static void put_tag(UINT8 *at, UINT32 type, UINT32 size)
{
    ((UINT32 *)at)[0] = type;
    ((UINT32 *)at)[1] = size;
}

EFI_STATUS efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *systab);
EFI_STATUS efi_main(EFI_HANDLE image, EFI_SYSTEM_TABLE *systab)
{
    InitializeLib(image, systab);
    Print(L"blimp.efi: starting blimp (%d KiB kernel image)\n",
          (UINTN)(blimp_payload_end - blimp_payload) / 1024);

    const struct handover *h = find_handover();
    if (!h)
        return fail(EFI_LOAD_ERROR);
    EFI_LOADED_IMAGE *li;
    EFI_STATUS st = BS->HandleProtocol(image, &LoadedImageProtocol, (void **)&li);
    if (EFI_ERROR(st)) {
        Print(L"blimp.efi: error: no loaded image protocol: %r\n", st);
        return fail(st);
    }
    st = get_cmdline(li);
    if (EFI_ERROR(st))
        return fail(st);
    char inject[32];
    UINTN inject_size = sizeof(inject) - 1;
    if (read_file(li, INJECT_FILE, inject, &inject_size) == EFI_SUCCESS) {
        inject[inject_size] = 0;
        inject_tag_size = CompareMem(inject, "mb2_tag_size", 12) == 0;
        enter_linux64 = CompareMem(inject, "linux64", 7) == 0;
        Print(L"blimp.efi: inject: %a\n", inject_tag_size ? "mb2_tag_size"
                                          : enter_linux64 ? "linux64"
                                                          : "(unknown: none)");
    }

    /* The kernel's range, image and .bss, at its link address. */
    EFI_PHYSICAL_ADDRESS kernel = h->load;
    UINTN kpages = (h->bss_end - h->load + 4095) / 4096;
    st = BS->AllocatePages(AllocateAddress, EfiLoaderData, kpages, &kernel);
    if (EFI_ERROR(st)) {
        Print(L"blimp.efi: error: the kernel's range 0x%lx-0x%lx is not free: %r\n", h->load,
              h->bss_end, st);
        return fail(st);
    }
    CopyMem((void *)(UINTN)h->load, blimp_payload, h->edata - h->load);
    SetMem((void *)(UINTN)h->edata, h->bss_end - h->edata, 0);

    /* The info block: header, command line, RSDP copy, then the EFI map (last: its size is
     * only known after the final GetMemoryMap), end tag. Below 4 GiB: kmain takes 32 bits. */
    UINTN map_size = 0, key, dsize;
    UINT32 dver;
    st = BS->GetMemoryMap(&map_size, NULL, &key, &dsize, &dver);
    if (st != EFI_BUFFER_TOO_SMALL || dsize < sizeof(EFI_MEMORY_DESCRIPTOR)) {
        Print(L"blimp.efi: error: GetMemoryMap: %r\n", st);
        return fail(st == EFI_SUCCESS ? EFI_DEVICE_ERROR : st);
    }
    UINTN rsdp_bytes = 0;
    UINT32 rsdp_tag = 0;
    const UINT8 *rsdp = find_rsdp(&rsdp_bytes, &rsdp_tag);
    UINTN cl = strlena((CHAR8 *)cmdline) + 1;
    UINTN map_space = map_size + MAP_SLACK_ENTRIES * dsize;
    UINTN map_off = 8 + align8(8 + cl) + (rsdp ? align8(8 + rsdp_bytes) : 0);
    UINTN total_max = map_off + 16 + map_space + 8;
    EFI_PHYSICAL_ADDRESS info = 0xffffffff;
    st = BS->AllocatePages(AllocateMaxAddress, EfiLoaderData, (total_max + 4095) / 4096, &info);
    if (EFI_ERROR(st)) {
        Print(L"blimp.efi: error: no memory below 4 GiB for the boot information: %r\n", st);
        return fail(st);
    }
    UINT8 *b = (UINT8 *)(UINTN)info;
    SetMem(b, total_max, 0);
    UINTN off = 8;
    put_tag(b + off, MB2_TAG_CMDLINE, 8 + cl);
    CopyMem(b + off + 8, cmdline, cl);
    off += align8(8 + cl);
    if (rsdp) {
        put_tag(b + off, rsdp_tag, 8 + rsdp_bytes);
        CopyMem(b + off + 8, (void *)rsdp, rsdp_bytes);
        off += align8(8 + rsdp_bytes);
    } else {
        Print(L"blimp.efi: no ACPI RSDP in the configuration table\n");
    }
    EFI_PHYSICAL_ADDRESS zero_page = 0xffffffff;
    if (enter_linux64) {
        st = BS->AllocatePages(AllocateMaxAddress, EfiLoaderData, 1, &zero_page);
        if (EFI_ERROR(st)) {
            Print(L"blimp.efi: error: no page below 4 GiB for boot_params: %r\n", st);
            return fail(st);
        }
        SetMem((void *)(UINTN)zero_page, 4096, 0);
    }
    EFI_MEMORY_DESCRIPTOR *map = (void *)(b + map_off + 16);
    Print(L"blimp.efi: kernel at 0x%lx, boot information at 0x%lx, exiting boot services\n",
          h->load, info);

    /* No allocation and no printing from here on: either would change the map key. */
    int attempt;
    for (attempt = 0; attempt < EXIT_ATTEMPTS; attempt++) {
        map_size = map_space;
        st = BS->GetMemoryMap(&map_size, map, &key, &dsize, &dver);
        if (EFI_ERROR(st))
            fail_late("GetMemoryMap failed while exiting boot services");
        st = BS->ExitBootServices(image, key);
        if (st == EFI_SUCCESS)
            break;
        if (st != EFI_INVALID_PARAMETER)
            fail_late("ExitBootServices failed");
    }
    if (attempt == EXIT_ATTEMPTS)
        fail_late("ExitBootServices kept rejecting the memory map key");

    put_tag(b + map_off, MB2_TAG_EFI_MMAP, 16 + map_size);
    ((UINT32 *)(b + map_off))[2] = (UINT32)dsize;
    ((UINT32 *)(b + map_off))[3] = dver;
    off = map_off + align8(16 + map_size);
    put_tag(b + off, MB2_TAG_END, 8);
    ((UINT32 *)b)[0] = (UINT32)(off + 8);
    ((UINT32 *)b)[1] = 0;
    if (inject_tag_size)
        ((UINT32 *)b)[3] = (UINT32)(off + 8); /* the first tag's size: past the end */

    if (enter_linux64) {
        UINT8 *bp = (UINT8 *)(UINTN)zero_page;
        build_boot_params(bp, (const char *)b + 16, rsdp, (const UINT8 *)map, map_size, dsize);
        __asm__ volatile("cli; jmp *%1" : : "S"(bp), "r"(h->load + 0x200) : "memory");
    }
    __asm__ volatile("cli; jmp *%1" : : "D"(info), "r"(h->entry) : "memory");
    __builtin_unreachable();
}
