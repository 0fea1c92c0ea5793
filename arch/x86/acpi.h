/*
 * The ACPI facts the interrupt code needs, from the MADT ("APIC" table): where the local APIC
 * and the IOAPICs are, which global system interrupts (GSIs) each IOAPIC serves, and how ISA IRQs
 * map to GSIs (interrupt source overrides). Every table is checked (signature, length, checksum)
 * before a field of it is used.
 */
#ifndef ARCH_X86_ACPI_H
#define ARCH_X86_ACPI_H

#include <stdbool.h>
#include <stdint.h>

#define MADT_MAX_IOAPICS   8
#define MADT_MAX_OVERRIDES 16

/* MPS INTI flags of an override (ACPI 5.2.12.5): 0 in a field means "conforms to the bus". */
#define MADT_POLARITY_MASK 0x3
#define MADT_POLARITY_HIGH 0x1
#define MADT_POLARITY_LOW  0x3
#define MADT_TRIGGER_MASK  0xc
#define MADT_TRIGGER_EDGE  0x4
#define MADT_TRIGGER_LEVEL 0xc

struct madt_ioapic {
    uint8_t id;
    uint32_t phys;
    uint32_t gsi_base;
};

struct madt_override {
    uint8_t source; /* ISA IRQ */
    uint32_t gsi;
    uint16_t flags;
};

struct madt_info {
    bool found;          /* a valid MADT was read */
    bool pcat_compat;    /* the machine also has 8259 PICs (which we mask) */
    uint64_t lapic_phys; /* 0: not stated */
    unsigned n_ioapics, n_overrides;
    struct madt_ioapic ioapics[MADT_MAX_IOAPICS];
    struct madt_override overrides[MADT_MAX_OVERRIDES];
};

/* Finds the RSDP (rsdp_phys from the loader, else the BIOS areas), then the MADT through the
 * XSDT or RSDT, and fills *out. Returns true when a valid MADT was found. */
bool acpi_read_madt(uint64_t rsdp_phys, struct madt_info *out);

/* How to enter S5 (soft off) the ACPI way: write SLP_TYPx << 10 | SLP_EN to PM1x_CNT. */
struct acpi_s5 {
    uint16_t pm1a_cnt, pm1b_cnt; /* I/O ports; pm1b_cnt 0: none */
    uint8_t slp_typa, slp_typb;  /* from the DSDT's \_S5 package */
    uint16_t smi_cmd;            /* with acpi_enable: how to turn ACPI mode on, if needed */
    uint8_t acpi_enable;
};

/* The FADT's PM1 control blocks and the DSDT's \_S5 object, found through the RSDP as above.
 * False (and *out zeroed) when any of it is missing or malformed, or the machine is hardware-
 * reduced ACPI (no PM1 blocks: microvm). The DSDT is scanned for the one AML shape firmware
 * writes, Name (_S5, Package () { typa, typb, ... }), never interpreted. */
bool acpi_read_s5(uint64_t rsdp_phys, struct acpi_s5 *out);

#endif
