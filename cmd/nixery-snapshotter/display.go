package main

import (
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/term"

	"github.com/nixery-snapshotter/nixery-snapshotter/internal/progress"
)

// display shows a pull's progress. On a terminal, Nix's build log runs on
// one status line that each new log line replaces, between the steps
// (packages, layers with digest and size, time), which stay; elsewhere
// (a log file, CI) every line is printed as it comes.
type display struct {
	mu       sync.Mutex
	w        io.Writer
	width    int  // terminal columns; 0 when not a terminal
	onStatus bool // the cursor is on the status line
}

func newDisplay(w io.Writer) *display {
	d := &display{w: w}
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		if cols, _, err := term.GetSize(int(f.Fd())); err == nil && cols > 10 {
			d.width = cols
		}
	}
	return d
}

// Event implements progress.Sink: Nix's log on the status line, steps
// and layers on lines of their own.
func (d *display) Event(e progress.Event) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e.Kind == progress.KindNix {
		d.status(e.Text)
		return
	}
	d.clear()
	fmt.Fprintln(d.w, e.Text)
}

// status shows one line of Nix's log.
func (d *display) status(line string) {
	if d.width == 0 {
		fmt.Fprintln(d.w, "  nix:", line)
		return
	}
	line = "  nix: " + line
	if r := []rune(line); len(r) > d.width-1 {
		line = string(r[:d.width-2]) + "…"
	}
	fmt.Fprint(d.w, "\r\033[K"+line)
	d.onStatus = true
}

// clear clears the status line.
func (d *display) clear() {
	if d.onStatus {
		fmt.Fprint(d.w, "\r\033[K")
		d.onStatus = false
	}
}

// done clears the status line.
func (d *display) done() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.clear()
}
