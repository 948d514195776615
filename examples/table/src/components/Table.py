"""A sortable, paginated table whose page and sort live in the URL (url = ...)."""
from asok import Component, exposed

COLUMNS = {"name": "Fruit", "origin": "Origin", "price": "Price / kg"}
FRUITS = [
    ("Apple", "Poland", 1.9), ("Apricot", "Turkey", 4.2), ("Avocado", "Mexico", 6.5), ("Banana", "Ecuador", 1.4),
    ("Blackberry", "Serbia", 9.8), ("Blueberry", "Peru", 11.0), ("Cherry", "Chile", 8.9), ("Clementine", "Spain", 2.6),
    ("Coconut", "Philippines", 3.1), ("Date", "Tunisia", 7.4), ("Dragon fruit", "Vietnam", 8.2), ("Fig", "Greece", 9.1),
    ("Grape", "Italy", 3.8), ("Grapefruit", "Israel", 2.2), ("Guava", "India", 5.6), ("Kiwi", "New Zealand", 4.9),
    ("Lemon", "Spain", 2.4), ("Lime", "Brazil", 3.3), ("Lychee", "China", 10.5), ("Mango", "Pakistan", 4.4),
    ("Melon", "Morocco", 1.8), ("Nectarine", "Spain", 3.6), ("Orange", "Egypt", 1.7), ("Papaya", "Brazil", 4.8),
    ("Passion fruit", "Colombia", 12.3), ("Peach", "Italy", 3.5), ("Pear", "Belgium", 2.3), ("Persimmon", "Japan", 6.1),
    ("Pineapple", "Costa Rica", 2.1), ("Plum", "Romania", 2.9), ("Pomegranate", "Iran", 5.2), ("Quince", "Turkey", 3.9),
    ("Raspberry", "Portugal", 13.4), ("Starfruit", "Malaysia", 7.7), ("Strawberry", "Netherlands", 7.9),
    ("Tangerine", "Morocco", 2.5), ("Watermelon", "Spain", 1.1),
]
PER_PAGE = 8
PAGES = -(-len(FRUITS) // PER_PAGE)


class Table(Component):
    url = ("page", "sort")  # ?page=2&sort=-price: shareable, and back/forward step through them
    page: int = 1
    sort = "name"           # a column; "-price" sorts the other way

    def __setattr__(self, name, value):
        # every way a field is set (an edited URL, back and forward, a click) comes through here:
        # ?page=999 becomes the last page and ?sort=bogus the default, and the address shows that
        if name == "page":
            value = min(max(value, 1), PAGES)
        elif name == "sort" and value.lstrip("-") not in COLUMNS:
            value = "name"
        super().__setattr__(name, value)

    @exposed
    def sort_by(self, column: str):
        if column in COLUMNS:
            self.sort = "-" + column if self.sort == column else column
            self.page = 1

    @exposed
    def go(self, page: int):
        self.page = page

    def render(self):
        column, page = self.sort.lstrip("-"), self.page
        index = list(COLUMNS).index(column)
        rows = sorted(FRUITS, key=lambda row: row[index], reverse=self.sort.startswith("-"))
        return self.html("table.html", columns=COLUMNS, column=column, pages=PAGES, shown=page,
                         rows=rows[(page - 1) * PER_PAGE:page * PER_PAGE])
