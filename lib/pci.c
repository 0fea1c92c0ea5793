/* Portable PCI helpers over the config accessors of include/bus.h: the capability list. */
#include "include/bus.h"

void pci_cap_walk_start(struct pci_cap_walk *w, const struct pci_func *f)
{
    w->f = f;
    w->steps = 0;
    w->next = 0;
    if (pci_cfg_read16(f, PCI_CFG_STATUS) & PCI_STATUS_CAP_LIST)
        w->next = pci_cfg_read8(f, PCI_CFG_CAP_PTR);
}

unsigned pci_cap_walk_next(struct pci_cap_walk *w, uint8_t cap_id)
{
    while (w->steps < PCI_CAP_MAX_STEPS) {
        /* The two low bits of every pointer are reserved (PCI 3.0, 6.7): mask them. */
        unsigned off = w->next & 0xfc;
        if (off < PCI_CAP_FIRST)
            break;
        w->steps++;
        w->next = pci_cfg_read8(w->f, off + 1);
        if (pci_cfg_read8(w->f, off) == cap_id)
            return off;
    }
    w->next = 0;
    return 0;
}

unsigned pci_find_cap(const struct pci_func *f, uint8_t cap_id)
{
    struct pci_cap_walk w;
    pci_cap_walk_start(&w, f);
    return pci_cap_walk_next(&w, cap_id);
}
